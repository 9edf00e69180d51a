"""The data sets (the eight commonsense sets' row mappings, prompts, tokenization) and the resumable loader."""
