from loratrace.cli import main

raise SystemExit(main())
