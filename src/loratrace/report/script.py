"""The report's own JavaScript (plain, inlined in the page's head after plotly.js; nothing loaded from outside):

- `LT.curves`: draws the loss / lr / grad-norm plot with each step's batch in the hover (its first example ids, then
  "+N", and its worst per-example losses); a click on a point shows the whole batch below the plot;
- `LT.smooth`, `LT.logScale`: the curves' smoothing slider (an exponential moving average, debiased as TensorBoard's)
  and log-scale toggle;
- `LT.table`: the examples table, searchable and sortable, drawn a page at a time (thousands of rows stay quick).

Data comes from `LT.runs`, `LT.examples` and `LT.batches`, set by a script at the top of the body (report/sections.py).
"""

SCRIPT = r"""
const LT = {runs: [], examples: {rows: []}, batches: [], pageSize: 100};
LT.esc = s => String(s).replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;',
                                                    "'": '&#39;'}[c]));
LT.num = v => v === null || v === undefined ? '' :
  (Number.isInteger(v) ? String(v) : String(Number(Number(v).toPrecision(4))));
LT.stepIndex = r => LT.batches[r].index || (LT.batches[r].index = new Map(LT.batches[r].steps.map((s, k) => [s, k])));
// A batch member: its examples-table row (ids hold the run's example index i, or -i - 1 where it was wrong).
LT.row = (r, v) => LT.batches[r].offset + (v >= 0 ? v : -v - 1);
LT.worst = (r, k, n) => {
  const loss = LT.batches[r].loss[k];
  const order = loss.map((_, j) => j).filter(j => loss[j] !== null).sort((a, b) => loss[b] - loss[a]);
  return n ? order.slice(0, n) : order.concat(loss.map((_, j) => j).filter(j => loss[j] === null));
};
LT.batchText = (r, k) => {
  const b = LT.batches[r], ids = b.ids[k], rows = LT.examples.rows, name = v => LT.esc(rows[LT.row(r, v)][1]);
  const more = ids.length > 5 ? ' +' + (ids.length - 5) : '';
  const worst = LT.worst(r, k, 3).map(j => name(ids[j]) + ' ' + LT.num(b.loss[k][j])).join(', ');
  return 'batch: ' + ids.slice(0, 5).map(name).join(', ') + more + '<br>worst losses: ' + worst +
    '<br>click for the whole batch';
};
// plotly's JSON holds numpy arrays as {dtype, bdata: base64}; the hover and smoothing need plain arrays
LT.typed = {i1: Int8Array, u1: Uint8Array, i2: Int16Array, u2: Uint16Array, i4: Int32Array, u4: Uint32Array,
            f4: Float32Array, f8: Float64Array};
LT.array = a => {
  if (!a || !a.bdata) return a;
  const bytes = Uint8Array.from(atob(a.bdata), c => c.charCodeAt(0));
  return Array.from(new LT.typed[a.dtype](bytes.buffer));
};
LT.curves = (id, f) => {
  f.data.forEach(tr => { tr.x = LT.array(tr.x); tr.y = LT.array(tr.y); });
  f.data.forEach(tr => {
    if (!tr.meta || tr.meta.batch === undefined || !LT.batches[tr.meta.run]) return;
    const r = tr.meta.run, index = LT.stepIndex(r), texts = LT.batches[r].texts || (LT.batches[r].texts = {});
    tr.text = tr.x.map(s => index.has(s) ? (texts[s] || (texts[s] = LT.batchText(r, index.get(s)))) : '');
  });
  // the raw values, for the hover and for smoothing
  f.data.forEach(tr => { if (tr.meta && tr.meta.smooth) tr.customdata = tr.y.slice(); });
  Plotly.newPlot(id, f.data, f.layout, LT.config);
  const gd = document.getElementById(id);
  gd.on('plotly_click', ev => {
    const p = ev.points[0];
    if (p.data.meta && p.data.meta.batch !== undefined) LT.showBatch(p.data.meta.run, p.x);
  });
};
LT.smooth = (id, w) => {
  const gd = document.getElementById(id), ys = [], which = [];
  gd.data.forEach((tr, i) => {
    if (!tr.meta || !tr.meta.smooth) return;
    let last = 0, n = 0;
    ys.push(tr.customdata.map(v => {
      if (v === null || !isFinite(v)) return v;
      last = last * w + (1 - w) * v; n += 1;
      return w > 0 ? last / (1 - Math.pow(w, n)) : v;
    }));
    which.push(i);
  });
  Plotly.restyle(gd, {y: ys}, which);
};
LT.logScale = (id, on) => {
  const gd = document.getElementById(id), change = {};
  Object.keys(gd.layout).filter(k => /^yaxis\d*$/.test(k))
    .forEach(k => { change[k + '.type'] = on ? 'log' : 'linear'; });
  Plotly.relayout(gd, change);
};
LT.showBatch = (r, step) => {
  const view = document.getElementById('batch-view'), b = LT.batches[r];
  const k = b ? LT.stepIndex(r).get(Number(step)) : undefined;
  if (k === undefined) {
    view.innerHTML = '<p class="missing">no batch recorded for step ' + LT.esc(step) + '</p>';
    return;
  }
  const rows = LT.examples.rows, ids = b.ids[k];
  const body = LT.worst(r, k, 0).map(j => {
    const row = rows[LT.row(r, ids[j])], id = LT.esc(row[1]);
    return '<tr><td>' + j + '</td><td><a href="#section-examples" class="example-link" data-id="' + id + '">' + id +
      '</a></td><td>' + LT.num(b.loss[k][j]) + '</td><td>' + (ids[j] >= 0 ? 'yes' : 'no') + '</td><td class="prompt">' +
      LT.esc(row[2] ?? '') + '</td></tr>';
  }).join('');
  view.innerHTML = '<h3>' + LT.esc(LT.runs[r].label) + ', step ' + LT.esc(step) + ': the whole batch (' + ids.length +
    ' examples, worst loss first)</h3><div class="scroll tall"><table><thead><tr><th>position</th><th>example</th>' +
    '<th>loss</th><th>correct</th><th>prompt</th></tr></thead><tbody>' + body + '</tbody></table></div>';
  view.querySelectorAll('a.example-link').forEach(a => a.addEventListener('click', () => LT.find(a.dataset.id)));
};
LT.find = text => {
  const box = document.getElementById('examples-search');
  if (box) { box.value = text; box.dispatchEvent(new Event('input')); }
};
LT.spark = all => {
  const values = (all || []).filter(v => v !== null);  // a non-finite p(gold) is left out
  if (!values.length) return '';
  const w = 80, h = 18, n = values.length;
  const pts = values.map((v, i) => (n > 1 ? i * w / (n - 1) : w / 2).toFixed(1) + ',' + (h - v * h).toFixed(1));
  return '<svg class="spark" width="' + w + '" height="' + h + '" viewBox="0 -1 ' + w + ' ' + (h + 2) + '"><title>' +
    values.join(' ') + '</title>' + (n > 1 ? '<polyline fill="none" stroke="#1f77b4" points="' + pts.join(' ') + '"/>' :
    '<circle r="2" fill="#1f77b4" cx="' + pts[0].replace(',', '" cy="') + '"/>') + '</svg> ' +
    LT.num(values[n - 1]);
};
LT.cell = (col, v) => {
  if (col.type === 'spark') return LT.spark(v);
  if (col.type === 'bool') return v === null ? '' : (v ? 'yes' : 'no');
  if (col.type === 'run') {
    return '<span title="' + LT.esc(LT.runs[v].run_id) + '">' + LT.esc(LT.runs[v].label) + '</span>';
  }
  if (typeof v === 'number') return LT.num(v);
  return v === null ? '' : LT.esc(v);
};
LT.key = (col, v) => {
  if (v === null || v === undefined) return null;
  if (col.type === 'spark') return v.length ? v[v.length - 1] : null;
  if (col.type === 'run') return LT.runs[v].label;
  return typeof v === 'boolean' ? Number(v) : v;
};
LT.table = (id, columns, rows) => {
  const root = document.getElementById(id);
  const state = {text: '', col: null, dir: 1, page: 0, shown: rows.map((_, i) => i)};
  const text = (c, v) => c.type === 'run' ? LT.runs[v].label : String(v ?? '');
  const hay = rows.map(r => columns.filter(c => c.search).map(c => text(c, r[c.index])).join(' ').toLowerCase());
  const heads = columns.map((c, i) => '<th class="sortable" data-col="' + i + '" title="' +
    LT.esc(c.help || 'click to sort') + '">' + LT.esc(c.label) + '</th>').join('');
  root.innerHTML = '<div class="controls"><input type="search" id="' + id + '-search" size="40"' +
    ' placeholder="search id, prompt, run"> <span class="count"></span> <button class="prev">previous</button>' +
    ' <button class="next">next</button></div><div class="scroll"><table class="lt-table"><thead><tr>' + heads +
    '</tr></thead><tbody></tbody></table></div>';
  const tbody = root.querySelector('tbody'), count = root.querySelector('.count');
  const draw = () => {
    const pages = Math.max(1, Math.ceil(state.shown.length / LT.pageSize));
    state.page = Math.min(state.page, pages - 1);
    const start = state.page * LT.pageSize, part = state.shown.slice(start, start + LT.pageSize);
    tbody.innerHTML = part.map(i => '<tr>' + columns.map(c => '<td class="' + (c.cls || '') + '">' +
      LT.cell(c, rows[i][c.index]) + '</td>').join('') + '</tr>').join('');
    count.textContent = state.shown.length ? 'rows ' + (start + 1) + '-' + (start + part.length) + ' of ' +
      state.shown.length + (state.shown.length < rows.length ? ' (of ' + rows.length + ')' : '') : 'no rows match';
  };
  const order = () => {
    state.shown = rows.map((_, i) => i).filter(i => !state.text || hay[i].includes(state.text));
    if (state.col !== null) {
      const c = columns[state.col];
      const keys = new Map(state.shown.map(i => [i, LT.key(c, rows[i][c.index])]));
      state.shown.sort((a, b) => {
        const x = keys.get(a), y = keys.get(b);
        if (x === null || y === null) return x === y ? a - b : (x === null ? 1 : -1);  // unknown last either way
        return (x < y ? -1 : x > y ? 1 : a - b) * state.dir;
      });
    }
    draw();
  };
  root.querySelector('input').addEventListener('input', e => { state.text = e.target.value.trim().toLowerCase();
                                                               state.page = 0; order(); });
  root.querySelectorAll('th').forEach(th => th.addEventListener('click', () => {
    const col = Number(th.dataset.col);
    state.dir = state.col === col ? -state.dir : 1; state.col = col; state.page = 0;
    root.querySelectorAll('th').forEach(h => h.classList.remove('asc', 'desc'));
    th.classList.add(state.dir > 0 ? 'asc' : 'desc');
    order();
  }));
  root.querySelector('.prev').addEventListener('click', () => { state.page = Math.max(0, state.page - 1); draw(); });
  root.querySelector('.next').addEventListener('click', () => { state.page += 1; draw(); });
  order();
};
"""
