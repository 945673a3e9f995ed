// A small Markdown renderer that builds DOM nodes: text only ever enters the page through text
// nodes, never innerHTML, so neither an answer nor a manual can inject markup. Enough for what
// models write: paragraphs, headings, lists (nested), code blocks and spans, tables, quotes,
// bold, italics, http(s) links and citations [n]. Unclosed markers stay literal text, so a
// half-streamed answer renders without flicker of stray markup.
'use strict';
(() => {
  const FENCE = /^\s{0,3}(```|~~~)/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^\s{0,3}>\s?(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
  // One alternative per inline construct; the first that matches at a position wins.
  const INLINE = new RegExp([
    '(`+)([^`][\\s\\S]*?)\\1(?!`)',                       // 1,2 code span
    '\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*',                  // 3 strong
    '__(?=\\S)([\\s\\S]*?\\S)__(?!\\w)',                   // 4 strong
    '\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*',                // 5 em
    '(?<![\\w])_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?![\\w])', // 6 em
    '\\[(\\d{1,3}(?:\\s*,\\s*\\d{1,3})*)\\]',             // 7 citations [1] or [1, 3]
    '\\[([^\\]\\n]{1,300})\\]\\((https?://[^\\s)]{1,2000})\\)', // 8,9 link
  ].join('|'), 'g');

  function node(tag, cls) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    return e;
  }

  // Inline text -> nodes appended to `parent`. opts.cite(n) returns a node for citation n or
  // null (then it stays text).
  function inline(parent, text, opts, depth) {
    if (depth > 8) { parent.append(text); return; }
    let last = 0;
    const re = new RegExp(INLINE); // its own lastIndex: this function recurses
    for (let m; (m = re.exec(text));) {
      if (m.index > last) parent.append(text.slice(last, m.index));
      last = re.lastIndex;
      if (m[2] !== undefined) {
        const c = node('code');
        c.textContent = m[2].replace(/^ (.*) $/, '$1');
        parent.append(c);
      } else if (m[3] !== undefined || m[4] !== undefined) {
        const s = node('strong');
        inline(s, m[3] !== undefined ? m[3] : m[4], opts, depth + 1);
        parent.append(s);
      } else if (m[5] !== undefined || m[6] !== undefined) {
        const s = node('em');
        inline(s, m[5] !== undefined ? m[5] : m[6], opts, depth + 1);
        parent.append(s);
      } else if (m[7] !== undefined) {
        const nums = m[7].split(',').map((x) => parseInt(x, 10));
        const links = nums.map((n) => (opts.cite ? opts.cite(n) : null));
        if (links.every(Boolean)) links.forEach((l) => parent.append(l));
        else parent.append(m[0]);
      } else if (m[8] !== undefined) {
        let url = null;
        try { url = new URL(m[9]); } catch (e) { /* not a URL: stays text */ }
        if (url && (url.protocol === 'http:' || url.protocol === 'https:')) {
          const a = node('a');
          a.href = url.href;
          a.rel = 'noopener noreferrer nofollow';
          a.target = '_blank';
          inline(a, m[8], opts, depth + 1);
          parent.append(a);
        } else parent.append(m[0]);
      }
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  // Lines of a paragraph: single line breaks kept (models use them for steps).
  function paragraph(lines, opts) {
    const p = node('p');
    lines.forEach((line, i) => {
      if (i) p.append(node('br'));
      inline(p, line.trim(), opts, 0);
    });
    return p;
  }

  function cells(line) {
    let s = line.trim();
    if (s.startsWith('|')) s = s.slice(1);
    if (s.endsWith('|') && !s.endsWith('\\|')) s = s.slice(0, -1);
    return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, '|'));
  }

  function table(head, sep, rows, opts) {
    const align = cells(sep).map((c) => (c.startsWith(':') && c.endsWith(':') ? 'center'
      : c.endsWith(':') ? 'right' : ''));
    const wrap = node('div', 'table'), t = node('table'), thead = node('thead'),
      tbody = node('tbody'), tr = node('tr');
    cells(head).forEach((c, i) => {
      const th = node('th');
      th.scope = 'col';
      if (align[i]) th.style.textAlign = align[i];
      inline(th, c, opts, 0);
      tr.append(th);
    });
    thead.append(tr);
    for (const row of rows) {
      const r = node('tr');
      cells(row).forEach((c, i) => {
        const td = node('td');
        if (align[i]) td.style.textAlign = align[i];
        inline(td, c, opts, 0);
        r.append(td);
      });
      tbody.append(r);
    }
    t.append(thead, tbody);
    wrap.append(t);
    return wrap;
  }

  // A run of list lines -> nested lists by indentation.
  function list(lines, opts) {
    const root = { indent: -1, el: null, children: [] };
    const stack = [root];
    let current = null;
    for (const line of lines) {
      const m = ITEM.exec(line);
      if (!m) { // a continuation line of the current item
        if (current) current.text.push(line.trim());
        continue;
      }
      const indent = m[1].replace(/\t/g, '    ').length;
      while (stack.length > 1 && indent <= stack[stack.length - 1].indent) stack.pop();
      const parent = stack[stack.length - 1];
      const ordered = /\d/.test(m[2]);
      current = { indent, ordered, start: ordered ? parseInt(m[2], 10) : 1, text: [m[3]],
        children: [] };
      parent.children.push(current);
      stack.push(current);
    }
    const build = (items) => {
      const out = [];
      let el = null;
      for (const it of items) {
        if (!el || (el.tagName === 'OL') !== it.ordered) {
          el = node(it.ordered ? 'ol' : 'ul');
          if (it.ordered && it.start !== 1) el.start = it.start;
          out.push(el);
        }
        const li = node('li');
        it.text.forEach((t, i) => { if (i) li.append(node('br')); inline(li, t, opts, 0); });
        for (const sub of build(it.children)) li.append(sub);
        el.append(li);
      }
      return out;
    };
    return build(root.children);
  }

  function blocks(lines, opts, depth) {
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) { i++; continue; }
      let m;
      if ((m = FENCE.exec(line))) {
        const body = [];
        for (i++; i < lines.length && !lines[i].trim().startsWith(m[1]); i++) body.push(lines[i]);
        i++;
        const pre = node('pre'), code = node('code');
        code.textContent = body.join('\n');
        pre.append(code);
        out.push(pre);
      } else if ((m = HEADING.exec(line))) {
        const h = node('h' + Math.min(6, m[1].length + 2));
        inline(h, m[2], opts, 0);
        out.push(h);
        i++;
      } else if (RULE.test(line)) {
        out.push(node('hr'));
        i++;
      } else if (line.includes('|') && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])) {
        const rows = [];
        let j = i + 2;
        for (; j < lines.length && lines[j].includes('|') && lines[j].trim(); j++) rows.push(lines[j]);
        out.push(table(line, lines[i + 1], rows, opts));
        i = j;
      } else if (QUOTE.test(line) && depth < 4) {
        const inner = [];
        for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) inner.push(m[1]);
        const q = node('blockquote');
        q.append(...blocks(inner, opts, depth + 1));
        out.push(q);
      } else if (ITEM.test(line)) {
        const items = [];
        for (; i < lines.length; i++) {
          const l = lines[i];
          if (!l.trim()) {
            // A blank line ends the list unless another item follows.
            if (i + 1 < lines.length && ITEM.test(lines[i + 1])) continue;
            break;
          }
          if (!ITEM.test(l) && !/^\s+\S/.test(l) && items.length && isBlockStart(l)) break;
          items.push(l);
        }
        out.push(...list(items, opts));
      } else {
        const para = [];
        for (; i < lines.length && lines[i].trim() && !(para.length && isBlockStart(lines[i])); i++)
          para.push(lines[i]);
        out.push(paragraph(para, opts));
      }
    }
    return out;
  }

  function isBlockStart(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || ITEM.test(line) ||
      QUOTE.test(line);
  }

  // Markdown text -> a DocumentFragment.
  function render(text, opts) {
    const frag = document.createDocumentFragment();
    frag.append(...blocks(String(text).replace(/\r\n?/g, '\n').split('\n'), opts || {}, 0));
    return frag;
  }

  window.edgekb = window.edgekb || {};
  window.edgekb.markdown = { render, inline };
})();
