// edgekb web page: conversations over protocol edgekb.v2 (link.js moves the frames). No
// dependencies, no build step. Server text only enters the page as text nodes (markdown.js
// builds elements; nothing uses innerHTML).
'use strict';
(() => {
  const K = window.edgekb;
  // A script that did not arrive whole (a cut link) leaves its part missing: then this page
  // does not start, and the boot guard in index.html loads it again.
  if (!K || !K.markdown || !K.Link || !K.admin) return;
  const $ = (s) => document.querySelector(s);
  const form = $('#ask-form'), input = $('#q'), askBtn = $('#ask'), kbSelect = $('#kb'),
    conn = $('#conn'), cards = $('#cards'), notice = $('#notice'), hintsEl = $('#hints'),
    welcomeEl = $('#welcome'), titleEl = $('#conv-title'), drawer = $('#drawer'),
    menuBtn = $('#menu'), convList = $('#conv-list'), convEmpty = $('#conv-empty'),
    announcer = $('#announce'), earlierBtn = $('#earlier'), loginForm = $('#login-form'),
    logoutBtn = $('#logout'), docsBtn = $('#docs-btn'), adminEl = $('#admin');
  const STAGES = { retrieving: 'Searching the manuals…', reading: 'Reading the sources',
    generating: 'Writing the answer…' };
  const FINAL = new Set(['done', 'length', 'cancelled', 'error', 'history']);
  const TYPING_DELAY_MS = 400, MIN_TYPED = 4, HISTORY_PAGE = 20, SNIPPET_SHOWN = 220;

  // ---- small helpers ----
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = String(text);
    return e;
  }
  // Small line icons, drawn (an emoji font is not on every device).
  const ICONS = { rename: 'M4 20h4L19 9l-4-4L4 16zM14 6l4 4', delete: 'M5 7h14M10 7V4h4v3M7 7l1 13h8l1-13M10 11v6M14 11v6' };
  function icon(name) {
    const ns = 'http://www.w3.org/2000/svg', svg = document.createElementNS(ns, 'svg'),
      path = document.createElementNS(ns, 'path');
    svg.setAttribute('viewBox', '0 0 24 24');
    svg.setAttribute('aria-hidden', 'true');
    path.setAttribute('d', ICONS[name]);
    svg.append(path);
    return svg;
  }
  function button(cls, text, onClick, label) {
    const b = el('button', cls, text);
    b.type = 'button';
    if (label) b.setAttribute('aria-label', label);
    b.addEventListener('click', onClick);
    return b;
  }
  // localStorage / sessionStorage as JSON, failing soft (private mode, full quota).
  function keeper(area) {
    return {
      get(k, d) { try { const v = area.getItem('edgekb.' + k); return v == null ? d : JSON.parse(v); } catch (e) { return d; } },
      set(k, v) { try { area.setItem('edgekb.' + k, JSON.stringify(v)); } catch (e) { /* full */ } },
      del(k) { try { area.removeItem('edgekb.' + k); } catch (e) { /* ignore */ } },
    };
  }
  const device = keeper(localStorage), tab = keeper(sessionStorage);
  const newId = (p) => p + '-' + Date.now().toString(36) + '-' +
    Math.random().toString(36).slice(2, 8);
  const norm = (s) => String(s || '').replace(/\s+/g, ' ').trim();
  const clean = (s) => norm(String(s || '').replace(/[¶§]/g, ' '));
  const cut = (s, n) => (s.length > n ? s.slice(0, n - 1).trimEnd() + '…' : s);
  const codePoints = (s) => Array.from(s).length;
  const utf8 = (s) => new TextEncoder().encode(s).length;
  function setConn(state, text) { conn.dataset.state = state; conn.textContent = text; }
  function showNotice(text) { notice.textContent = text || ''; notice.hidden = !text; }
  function announce(text) { announcer.textContent = ''; setTimeout(() => { announcer.textContent = text; }, 50); }
  function fmtS(s) { return s < 60 ? Math.round(s) + ' s' : Math.floor(s / 60) + ' min ' + Math.round(s % 60) + ' s'; }
  function fmtMs(ms) { return ms >= 1000 ? (ms / 1000).toFixed(1) + ' s' : Math.round(ms) + ' ms'; }
  function ago(t) {
    const s = Date.now() / 1000 - t;
    if (s < 90) return 'just now';
    if (s < 5400) return Math.round(s / 60) + ' min ago';
    if (s < 129600) return Math.round(s / 3600) + ' h ago';
    return new Date(t * 1000).toLocaleDateString();
  }

  // HTTP API: JSON in and out, the CSRF token on changes, typed errors thrown.
  function csrf() {
    const m = document.cookie.match(/(?:^|; )edgekb_csrf=([^;]*)/);
    return m ? decodeURIComponent(m[1]) : '';
  }
  async function api(method, path, body) {
    const headers = {};
    if (method !== 'GET') headers['X-CSRF-Token'] = csrf();
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const r = await fetch(path, { method, headers, credentials: 'same-origin',
      body: body === undefined ? undefined : JSON.stringify(body) });
    let data = null;
    try { data = await r.json(); } catch (e) { /* not JSON */ }
    if (!r.ok) {
      const err = new Error((data && data.error && data.error.message) || 'HTTP ' + r.status);
      err.code = data && data.error && data.error.code;
      err.status = r.status;
      throw err;
    }
    return data;
  }

  // ---- who, where ----
  // A tab keeps its own client id and conversation; a new tab starts in the last one used.
  let clientId = tab.get('client') || newId('tab');
  tab.set('client', clientId);
  let session = tab.get('session') || device.get('lastSession', '');
  let me = null;              // {user, role} once known
  let maxBytes = 65536, historyLoaded = false, oldestTurn = null, examples = device.get('examples', null);
  const reqs = new Map();     // request id -> its card and state
  let convTitles = new Map(); // session id -> title, from the last list

  function setSession(id) {
    session = id;
    tab.set('session', id);
    device.set('lastSession', id);
  }

  // Questions not finished, kept on the device so a reload (or the link coming back) goes on:
  // id -> {session, text, kbs, sent, at}. `sent` false: typed offline, never sent yet.
  function pending() { return device.get('pending', {}); }
  function keepPending(r) {
    const all = pending();
    all[r.id] = { session: r.session, text: r.text, kbs: r.kbs, sent: r.sent, at: r.at };
    device.set('pending', all);
  }
  function dropPending(id) {
    const all = pending();
    if (id in all) { delete all[id]; device.set('pending', all); }
  }

  const link = K.Link({
    url: () => (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws?' +
      new URLSearchParams(Object.assign({ client: clientId }, session ? { session } : {})),
    welcome: onWelcome,
    event: onEvent,
    state: (name, text) => { setConn(name, text); syncComposer(); },
    lost: onLost,
    unauthorized: () => checkSignIn(),
    takenOver: () => { clientId = newId('tab'); tab.set('client', clientId); },
  });

  // ---- requests ----
  function ask(text, kbs) {
    text = text.trim();
    if (!text) return;
    hideWelcome();
    const r = makeCard(newId('r'), text, kbs || selectedKbs(), session);
    const msg = { type: 'ask', id: r.id, text: r.text };
    if (r.kbs) msg.kbs = r.kbs;
    if (utf8(JSON.stringify(msg)) > maxBytes) {
      end(r, 'error', 'This question is longer than the appliance accepts.');
      return;
    }
    keepPending(r);
    updateTitle();
    if (!sendAsk(r)) {
      setStatus(r, 'waiting', 'Waiting for the connection: it will be sent when the link returns');
      link.kick();
    }
    r.card.scrollIntoView({ block: 'nearest' });
  }

  function sendAsk(r) {
    const msg = { type: 'ask', id: r.id, text: r.text };
    if (r.kbs) msg.kbs = r.kbs;
    if (!link.send(msg)) return false;
    r.sent = true;
    r.tries++;
    keepPending(r);
    setStatus(r, 'sent', 'Sent…');
    return true;
  }

  // Exactly what is missing: the server replays the events after the last seq this card has.
  function resume(r) {
    if (!link.send({ type: 'resume', id: r.id, after: r.seq })) return;
    r.sent = true;
    if (r.stage === 'lost') setStatus(r, ...(r.beforeLost || ['following', 'Resuming…']));
  }

  function cancel(r) {
    if (!r.active) return;
    if (r.sent && link.send({ type: 'cancel', id: r.id })) {
      setStatus(r, 'stopping', 'Stopping…');
      return;
    }
    end(r, 'cancelled', null, 'Stopped');  // never sent: it just does not go
  }

  function onLost() {
    for (const r of reqs.values()) {
      if (!r.active || !r.sent || r.stage === 'lost') continue;
      r.beforeLost = [r.stage, r.stText.textContent, r.bar.hidden ? null : r.bar.value];
      setStatus(r, 'lost', 'Connection lost: the answer goes on, resuming…');
    }
    clearHints();
  }

  function onWelcome(m) {
    const lim = m.limits || {};
    if (lim.max_message_bytes > 0) maxBytes = lim.max_message_bytes;
    if (m.server) conn.title = String(m.server);
    const asked = session;
    if (asked && m.session !== asked && [...reqs.values()].some((r) => r.sent)) {
      // The conversation is gone (deleted on another device): its unsent questions move on.
      showNotice('That conversation no longer exists on the appliance; this is a new one.');
      for (const r of [...reqs.values()]) {
        if (r.active && !r.sent) { r.session = m.session; keepPending(r); } else forget(r);
      }
      historyLoaded = false;
    } else showNotice('');
    setSession(m.session);
    const running = new Map((Array.isArray(m.running) ? m.running : []).map((x) => [x.id, x.seq]));
    for (const r of reqs.values()) {
      if (!r.active) continue;
      if (r.sent || running.has(r.id)) resume(r); else sendAsk(r);
    }
    const strangers = [...running.keys()].filter((id) => !reqs.has(id));
    strangers.forEach(follow);
    if (strangers.length) fillQuestions();
    if (!historyLoaded) {
      if (m.resumed) link.send({ type: 'history', limit: HISTORY_PAGE });
      else { historyLoaded = true; maybeWelcome(); }
    }
    updateTitle();
    const typed = norm(input.value);
    if (typed.length >= MIN_TYPED) sendTyping(typed);
  }

  // A running request this page did not ask (another tab or device, or before a reload).
  function follow(id) {
    const known = pending()[id];
    const r = makeCard(id, known ? known.text : '…', known ? known.kbs : null, session);
    r.sent = true;
    setStatus(r, 'following', 'Following an answer in progress…');
    resume(r);
  }
  async function fillQuestions() {
    try {
      const detail = await api('GET', '/api/sessions/' + encodeURIComponent(session));
      for (const x of detail.running || []) {
        const r = reqs.get(x.id);
        if (r && r.text === '…') { r.text = String(x.question || ''); r.qEl.textContent = r.text; }
      }
    } catch (e) { /* the card keeps its placeholder */ }
  }

  function onEvent(m) {
    const t = m.type;
    if (t === 'pong') return;
    if (t === 'history') { showHistory(m); return; }
    if (t === 'notice') { onNotice(m); return; }
    if (t === 'hint' && m.id == null) { showHints(m); return; }
    const r = m.id != null ? reqs.get(m.id) : undefined;
    if (t === 'error' && !r) { if (m.code !== 'unknown_request') showNotice(errorText(m)); return; }
    if (!r || !r.active) return;
    if (t === 'error' && typeof m.seq !== 'number') { refused(r, m); return; }
    if (typeof m.seq === 'number') { // nothing twice: a resume racing a live event
      if (m.seq <= r.seq) return;
      r.seq = m.seq;
    }
    switch (t) {
      case 'queued':
        r.queue = m.position > 0 ? { position: m.position, wait: m.wait_s, at: Date.now() } : null;
        if (m.position > 0) setStatus(r, 'queued', queueText(r));
        else setStatus(r, 'starting', 'Starting…');
        break;
      case 'status':
        r.queue = null;
        if (m.stage === 'reading') {
          const p = Number(m.progress);
          setStatus(r, 'reading', STAGES.reading + (isFinite(p) ? ' ' + Math.round(p * 100) + ' %' : '…'), p);
        } else if (m.stage !== 'retrieving' || !r.sources.length) {
          setStatus(r, String(m.stage), STAGES[m.stage] || String(m.stage));
        }
        break;
      case 'source':
        addSource(r, m);
        setStatus(r, 'found', foundText(r.sources));
        break;
      case 'delta':
        if (typeof m.text !== 'string') break;
        if (r.stage !== 'generating' && r.stage !== 'stopping') setStatus(r, 'generating', STAGES.generating);
        r.answer += m.text;
        scheduleRender(r);
        break;
      case 'hint':
        if (m.kind === 'see_also') showSeeAlso(r, m.sources);
        break;
      case 'done':
        onDone(r, m);
        break;
      case 'error':
        end(r, 'error', errorText(m), null, m.code === 'busy' || m.code === 'rate_limited' || m.code === 'internal');
        break;
      default: // unknown types are ignored (forward compatibility)
    }
  }

  // An error that answers the ask (no seq): nothing was stored for it.
  function refused(r, m) {
    if (m.code === 'unknown_request' && r.tries < 3) { sendAsk(r); return; } // never arrived
    if (m.code === 'id_reuse') { resume(r); return; } // it did arrive (another tab sent it)
    end(r, 'error', errorText(m), null, m.code === 'busy' || m.code === 'rate_limited' ||
      m.code === 'disk_full' || m.code === 'internal');
  }

  function errorText(m) {
    const why = {
      busy: 'The appliance is busy', rate_limited: 'Too many questions', disk_full:
        'The appliance\u2019s disk is full', not_found: 'Not found', storage_error:
        'The appliance could not store the answer', interrupted: 'The appliance restarted ' +
        'while writing this answer', unauthorized: 'Not signed in',
    }[m.code];
    let text = (why ? why + ': ' : '') + (m.message || m.code || 'error');
    if (m.retry_after != null) text += ' (try again in ' + Math.ceil(m.retry_after) + ' s)';
    return text;
  }

  function queueText(r) {
    const q = r.queue;
    let text = 'Queued: ' + q.position + (q.position === 1 ? ' answer' : ' answers') + ' ahead';
    if (Number.isFinite(q.wait)) {
      const left = q.wait - (Date.now() - q.at) / 1000;
      text += left > 1 ? ' · about ' + fmtS(left) : ' · any moment now';
    }
    return text;
  }

  function foundText(sources) {
    const docs = new Set(sources.map((s) => s.doc || s.title));
    return 'Found ' + sources.length + (sources.length === 1 ? ' passage' : ' passages') + ' in ' +
      docs.size + (docs.size === 1 ? ' manual' : ' manuals');
  }

  function onDone(r, m) {
    render(r);
    // The deltas add up to the answer: `done` says how long it is (counted in code points).
    if (Number.isFinite(m.chars) && m.chars !== codePoints(r.answer))
      r.card.append(el('p', 'err', 'Part of this answer was lost on the way; ask again.'));
    const f = m.finish;
    const stage = f === 'cancelled' ? 'cancelled' : f === 'length' ? 'length' : 'done';
    const t = m.timings || {}, u = m.usage || {}, bits = [];
    if (Number.isFinite(t.ttft_ms)) bits.push('first words after ' + fmtMs(t.ttft_ms));
    if (Number.isFinite(t.total_ms)) bits.push('total ' + fmtMs(t.total_ms));
    if (Number.isFinite(u.completion_tokens)) bits.push(u.completion_tokens + ' tokens');
    if (t.retrieval_reused) bits.push('sources found while you typed');
    if (bits.length) r.meta.textContent = bits.join(' · ');
    end(r, stage, null, stage === 'cancelled' ? 'Stopped' : stage === 'length'
      ? 'Done (length limit reached)' : 'Done');
  }

  // A request ends: the card stops changing. `err`: shown inline; `again`: offer to ask again.
  function end(r, stage, err, text, again) {
    r.active = false;
    r.queue = null;
    dropPending(r.id);
    setStatus(r, stage, text || (stage === 'error' ? 'Failed' : stage));
    r.ans.setAttribute('aria-busy', 'false');
    r.stopBtn.hidden = true;
    r.elapsed.textContent = r.started ? fmtS((Date.now() - r.started) / 1000) : '';
    if (r.answer) r.copyBtn.hidden = false;
    if (err) {
      r.card.append(el('p', 'err', err));
      if (again) r.card.append(button('plain again', 'Ask again', (e) => { e.target.remove(); ask(r.text, r.kbs); }));
    }
    if (stage === 'history') return;
    announce(stage === 'done' || stage === 'length' ? 'Answer ready' : stage === 'cancelled'
      ? 'Answer stopped' : 'The question failed');
    loadConversations();
  }

  function forget(r) {
    reqs.delete(r.id);
    r.card.remove();
  }

  // ---- cards ----
  function makeCard(id, text, kbs, sessionId) {
    const card = el('article', 'card');
    card.dataset.id = id;
    const q = el('h2', 'q', text);
    q.id = 'q-' + id;
    card.setAttribute('aria-labelledby', q.id);
    const st = el('div', 'st'), stText = el('span', 'st-text'), bar = el('progress'),
      elapsed = el('span', 'elapsed');
    st.dataset.testid = 'status';
    bar.max = 1; bar.hidden = true;
    const r = { id, text, kbs: kbs || null, session: sessionId, card, qEl: q, st, stText, bar,
      elapsed, seq: 0, active: true, sent: false, tries: 0, answer: '', sources: [],
      stage: '', at: Date.now(), started: Date.now(), queue: null, renderTimer: 0 };
    r.stopBtn = button('stop', 'Stop', () => cancel(r), 'Stop this answer');
    r.stopBtn.dataset.testid = 'stop';
    st.append(stText, bar, elapsed, r.stopBtn);
    const src = el('ol', 'src'), ans = el('div', 'ans'), tools = el('div', 'tools'),
      meta = el('span', 'meta');
    src.dataset.testid = 'sources';
    ans.dataset.testid = 'answer';
    ans.setAttribute('aria-busy', 'true');
    r.copyBtn = button('plain copy', 'Copy', () => copy(r), 'Copy the answer and its sources');
    r.copyBtn.dataset.testid = 'copy';
    r.copyBtn.hidden = true;
    tools.append(r.copyBtn, meta);
    r.src = src; r.ans = ans; r.meta = meta;
    card.append(q, st, src, ans, tools);
    cards.append(card);
    reqs.set(id, r);
    return r;
  }

  // key: a stable name (data-stage, for styling and tests); text: what the user reads.
  function setStatus(r, key, text, progress) {
    r.stage = key;
    r.st.dataset.stage = key;
    r.stText.textContent = text;
    const p = Number(progress);
    r.bar.hidden = !(progress != null && isFinite(p));
    if (!r.bar.hidden) r.bar.value = Math.max(0, Math.min(1, p));
    if (FINAL.has(key)) r.bar.hidden = true;
  }

  // Elapsed time on every waiting card, and the queue estimate counting down.
  setInterval(() => {
    for (const r of reqs.values()) {
      if (!r.active) continue;
      r.elapsed.textContent = fmtS((Date.now() - r.started) / 1000);
      if (r.queue && r.stage === 'queued') r.stText.textContent = queueText(r);
    }
  }, 1000);

  function scheduleRender(r) {
    if (!r.renderTimer) r.renderTimer = setTimeout(() => render(r), 60);
  }
  function render(r) {
    clearTimeout(r.renderTimer);
    r.renderTimer = 0;
    r.ans.replaceChildren(K.markdown.render(r.answer, { cite: (n) => citeLink(r, n) }));
  }

  function citeLink(r, n) {
    if (!r.sources.some((s) => s.n === n)) return null;
    const a = el('a', 'cite', '[' + n + ']');
    a.href = '#src-' + r.id + '-' + n;
    a.dataset.n = String(n);
    a.setAttribute('aria-label', 'source ' + n);
    a.addEventListener('click', (e) => { e.preventDefault(); openSource(r, n); });
    return a;
  }

  // Open the cited passage where it is: its source entry unfolds, comes into view and flashes.
  function openSource(r, n) {
    const li = r.src.querySelector('[data-n="' + n + '"]');
    if (!li) return;
    const d = li.querySelector('details');
    d.open = true;
    li.classList.remove('flash');
    void li.offsetWidth; // restart the animation
    li.classList.add('flash');
    li.scrollIntoView({ block: 'nearest', behavior: 'smooth' });
    d.querySelector('summary').focus({ preventScroll: true });
  }

  function addSource(r, s) {
    if (!s || typeof s !== 'object') return;
    const n = Number.isInteger(s.n) ? s.n : r.sources.length + 1;
    if (r.sources.some((x) => x.n === n)) return;
    r.sources.push(Object.assign({}, s, { n }));
    const li = el('li'), d = el('details'), sum = el('summary');
    li.dataset.n = String(n);
    li.id = 'src-' + r.id + '-' + n;
    const title = cut(clean(s.title) || clean(s.doc) || 'Untitled', 90);
    const where = clean(s.where).replace(/ > /g, ' › ');
    sum.append(el('span', 'n', '[' + n + ']'), ' ', el('b', '', title));
    if (where) sum.append(el('span', 'w', ' — ' + cut(where, 80)));
    if (s.relevance) {
      const band = el('span', 'band band-' + String(s.relevance).replace(/\W/g, ''), String(s.relevance) + ' match');
      sum.append(' ', band);
    }
    d.append(sum);
    const passage = el('div', 'passage');
    const place = [clean(s.doc), where, s.page != null && !/p\. ?\d/.test(where) ? 'p. ' + s.page : '']
      .filter(Boolean).join(' · ');
    if (place) passage.append(el('p', 'place', place));
    const snippet = clean(s.snippet);
    if (snippet) {
      const quote = el('blockquote');
      const mark = el('mark');
      highlight(mark, cut(snippet, SNIPPET_SHOWN), r.text);
      quote.append(mark);
      passage.append(quote);
      if (snippet.length > SNIPPET_SHOWN) {
        const more = button('plain more', 'Show all', () => {
          mark.replaceChildren(); highlight(mark, snippet, r.text); more.remove();
        });
        passage.append(more);
      }
    }
    d.append(passage);
    li.append(d);
    const after = [...r.src.children].find((x) => Number(x.dataset.n) > n);
    r.src.insertBefore(li, after || null);
    if (r.answer) scheduleRender(r); // a citation may now link
  }

  // The question's words in a passage, each in <strong> (inside the passage's <mark>).
  function highlight(parent, text, question) {
    const words = [...new Set(norm(question).toLowerCase().split(/[^\p{L}\p{N}_.-]+/u)
      .filter((w) => w.length >= 4))].map((w) => w.replace(/[.*+?^${}()|[\]\\-]/g, '\\$&'));
    if (!words.length) { parent.append(text); return; }
    const re = new RegExp('(' + words.join('|') + ')', 'giu');
    text.split(re).forEach((part, i) => parent.append(i % 2 ? el('strong', '', part) : part));
  }

  function showSeeAlso(r, sources) {
    const s = Array.isArray(sources) && sources[0];
    if (!s) return;
    const title = cut(clean(s.title) || clean(s.doc), 80);
    const where = clean(s.where).replace(/ > /g, ' › ');
    const topic = where.split(' › ').pop().replace(/, p\. ?\d+$/, '');
    const box = el('aside', 'see-also');
    box.dataset.testid = 'see-also';
    box.append(el('span', 'muted', 'See also: '));
    box.append(button('plain', title + (where ? ' — ' + where : ''), () => {
      input.value = topic ? 'What does the ' + title + ' say about ' + topic + '?' : 'What is in the ' + title + '?';
      input.focus();
      onTyped();
    }, 'Ask about ' + title + (where ? ', ' + where : '')));
    r.card.append(box);
  }

  async function copy(r) {
    const lines = [r.answer.trim()];
    if (r.sources.length) {
      lines.push('', 'Sources:');
      for (const s of r.sources) lines.push('[' + s.n + '] ' + clean(s.title || s.doc) + (s.where ? ', ' + clean(s.where) : ''));
    }
    const text = lines.join('\n');
    let ok = false;
    try { await navigator.clipboard.writeText(text); ok = true; } catch (e) {
      // No clipboard API on plain http: the old way still works.
      const area = el('textarea');
      area.value = text;
      area.setAttribute('readonly', '');
      area.style.position = 'fixed'; area.style.opacity = '0';
      document.body.append(area);
      area.select();
      try { ok = document.execCommand('copy'); } catch (e2) { ok = false; }
      area.remove();
    }
    r.copyBtn.textContent = ok ? 'Copied' : 'Copy failed';
    setTimeout(() => { r.copyBtn.textContent = 'Copy'; }, 2000);
  }

  // Earlier turns of the conversation, as finished cards above the live ones.
  function showHistory(m) {
    if (m.session !== session) return;
    const turns = Array.isArray(m.turns) ? m.turns : [];
    const first = cards.firstChild;
    for (const t of turns) {
      if (!t || reqs.has(t.id)) continue;
      const r = makeCard(t.id, t.question || '', null, session);
      cards.insertBefore(r.card, first);
      for (const s of Array.isArray(t.sources) ? t.sources : []) addSource(r, s);
      r.answer = String(t.answer || '');
      render(r);
      r.started = 0;
      end(r, 'history', t.finish === 'stop' || t.finish === 'length' ? null
        : t.finish === 'cancelled' ? null : 'Ended: ' + t.finish,
      t.finish === 'cancelled' ? 'Stopped earlier' : t.at ? 'Asked ' + ago(t.at) : 'Earlier answer');
    }
    if (turns.length) oldestTurn = turns[0].turn;
    earlierBtn.hidden = !m.more;
    historyLoaded = true;
    updateTitle();
    maybeWelcome();
    if (!first) window.scrollTo(0, document.body.scrollHeight);
  }
  earlierBtn.addEventListener('click', () => {
    if (oldestTurn != null) link.send({ type: 'history', before: oldestTurn, limit: HISTORY_PAGE });
  });

  function onNotice(m) {
    if (m.event === 'kb_updated') { loadExamples(); return; }
    showNotice(String(m.message || ''));
  }

  // ---- hints while typing ----
  let typingTimer = 0, lastTyped = '';
  function onTyped() {
    clearTimeout(typingTimer);
    const text = norm(input.value);
    if (text.length < MIN_TYPED) { clearHints(); lastTyped = ''; return; }
    typingTimer = setTimeout(() => sendTyping(text), TYPING_DELAY_MS);
  }
  function sendTyping(text) {
    if (text === lastTyped) return;
    const msg = { type: 'typing', text };
    const kbs = selectedKbs();
    if (kbs) msg.kbs = kbs;
    if (link.send(msg)) lastTyped = text;
  }
  function showHints(m) {
    const typed = norm(input.value);
    // Only what still matches what is typed: a hint for text since deleted is stale.
    if (!m.text || !typed.startsWith(m.text)) return;
    hintsEl.replaceChildren();
    for (const s of Array.isArray(m.sources) ? m.sources : []) {
      const li = el('li');
      li.append(el('b', '', cut(clean(s.title) || clean(s.doc), 60)));
      const where = clean(s.where).replace(/ > /g, ' › ');
      if (where) li.append(el('span', 'w', ' — ' + cut(where, 60)));
      if (s.relevance) li.append(' ', el('span', 'band band-' + String(s.relevance).replace(/\W/g, ''), String(s.relevance)));
      hintsEl.append(li);
    }
    hintsEl.dataset.for = m.text;
  }
  function clearHints() { hintsEl.replaceChildren(); delete hintsEl.dataset.for; }
  input.addEventListener('input', onTyped);

  // ---- the empty page: what this appliance knows, and questions to start with ----
  function hideWelcome() { welcomeEl.hidden = true; }
  function maybeWelcome() {
    welcomeEl.hidden = !(historyLoaded && !reqs.size);
    if (!welcomeEl.hidden) renderWelcome();
  }
  async function loadExamples() {
    try {
      examples = await api('GET', '/api/examples');
      device.set('examples', examples);
    } catch (e) { return; }
    renderKbChoice();
    if (!welcomeEl.hidden) renderWelcome();
  }
  function renderWelcome() {
    const box = $('#kb-overview'), list = $('#examples');
    box.replaceChildren(); list.replaceChildren();
    if (!examples) { box.append(el('p', 'muted', 'Loading what this appliance holds…')); return; }
    const kbs = examples.kbs || [];
    if (!kbs.length) {
      box.append(el('p', '', 'No manuals yet.' + (me && me.role === 'admin' ? ' Add some under Documents.' : ' Ask an administrator to add some.')));
    }
    for (const kb of kbs) {
      const p = el('p', 'kb');
      p.append(el('b', '', kb.name), ': ' + kb.documents + (kb.documents === 1 ? ' manual' : ' manuals'));
      const titles = el('ul', 'titles');
      for (const t of kb.titles || []) titles.append(el('li', '', cut(clean(t), 90)));
      if (kb.documents > (kb.titles || []).length) titles.append(el('li', 'muted', 'and ' + (kb.documents - kb.titles.length) + ' more'));
      box.append(p, titles);
    }
    const qs = examples.questions || [];
    $('#examples-title').hidden = !qs.length;
    for (const q of qs) {
      const li = el('li');
      li.append(button('example', q.text, () => ask(q.text, kbs.length > 1 && q.kb ? [q.kb] : null)));
      list.append(li);
    }
  }
  function renderKbChoice() {
    const kbs = (examples && examples.kbs) || [];
    const chosen = device.get('kb', '');
    kbSelect.replaceChildren(new Option('All manuals', ''));
    for (const kb of kbs) kbSelect.append(new Option(kb.name, kb.name));
    kbSelect.value = kbs.some((k) => k.name === chosen) ? chosen : '';
    kbSelect.hidden = kbs.length < 2;
  }
  function selectedKbs() { return !kbSelect.hidden && kbSelect.value ? [kbSelect.value] : null; }
  kbSelect.addEventListener('change', () => { device.set('kb', kbSelect.value); lastTyped = ''; onTyped(); });

  // ---- conversations ----
  async function loadConversations() {
    if (!me) return;
    let list;
    try { list = (await api('GET', '/api/sessions')).sessions || []; } catch (e) { return; }
    convTitles = new Map(list.map((s) => [s.id, s.title]));
    convList.replaceChildren();
    convEmpty.hidden = list.length > 0;
    for (const s of list) convList.append(conversationItem(s));
    updateTitle();
  }
  function conversationItem(s) {
    const li = el('li', 'conv');
    li.dataset.id = s.id;
    const open = button('conv-open', '', () => { switchTo(s.id); closeDrawer(); });
    open.append(el('span', 'conv-title', s.title || 'Untitled'),
      el('small', 'muted', ago(s.updated_at) + ' · ' + s.turns + (s.turns === 1 ? ' question' : ' questions')));
    if (s.id === session) open.setAttribute('aria-current', 'true');
    const rename = button('icon', '', () => startRename(li, s), 'Rename “' + s.title + '”');
    const del = button('icon', '', () => removeConversation(s), 'Delete “' + s.title + '”');
    rename.append(icon('rename'));
    del.append(icon('delete'));
    rename.dataset.testid = 'rename'; del.dataset.testid = 'delete';
    li.append(open, rename, del);
    return li;
  }
  function startRename(li, s) {
    const field = el('input', 'rename');
    field.value = s.title;
    field.setAttribute('aria-label', 'New name');
    field.maxLength = 120;
    li.replaceChildren(field);
    field.focus(); field.select();
    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      if (save && norm(field.value) !== s.title) {
        try { await api('PATCH', '/api/sessions/' + encodeURIComponent(s.id), { title: field.value }); } catch (e) { showNotice(e.message); }
      }
      loadConversations();
    };
    field.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') { e.preventDefault(); finish(true); }
      if (e.key === 'Escape') finish(false);
    });
    field.addEventListener('blur', () => finish(true));
  }
  async function removeConversation(s) {
    if (!confirm('Delete “' + s.title + '”? Its questions and answers are removed from the appliance.')) return;
    try { await api('DELETE', '/api/sessions/' + encodeURIComponent(s.id)); } catch (e) {
      if (e.code !== 'not_found') { showNotice(e.message); return; }
    }
    const all = pending();
    for (const id of Object.keys(all)) if (all[id].session === s.id) delete all[id];
    device.set('pending', all);
    if (s.id === session) newConversation(); else loadConversations();
  }
  function resetView() {
    for (const r of reqs.values()) clearTimeout(r.renderTimer);
    reqs.clear();
    cards.replaceChildren();
    historyLoaded = false;
    oldestTurn = null;
    earlierBtn.hidden = true;
    clearHints();
    hideWelcome();
    showNotice('');
  }
  function switchTo(id) {
    if (id === session) return;
    resetView();
    setSession(id);
    restorePending();
    link.restart();
  }
  function newConversation() {
    resetView();
    setSession('');
    link.restart();
    loadConversations();
    input.focus();
  }
  function updateTitle() {
    const t = convTitles.get(session) || (reqs.size ? [...reqs.values()][0].text : '');
    titleEl.textContent = t ? cut(t, 60) : 'New conversation';
    for (const li of convList.children) {
      const b = li.querySelector('.conv-open');
      if (b) b.toggleAttribute('aria-current', li.dataset.id === session);
    }
  }
  $('#new-conv').addEventListener('click', () => { newConversation(); closeDrawer(); });

  // The drawer: a panel on a phone, a sidebar on a wide screen (CSS decides).
  function openDrawer() {
    drawer.classList.add('open');
    menuBtn.setAttribute('aria-expanded', 'true');
    loadConversations();
    const first = drawer.querySelector('button');
    if (first) first.focus();
  }
  function closeDrawer() {
    if (!drawer.classList.contains('open')) return;
    drawer.classList.remove('open');
    menuBtn.setAttribute('aria-expanded', 'false');
  }
  menuBtn.addEventListener('click', () => (drawer.classList.contains('open') ? closeDrawer() : openDrawer()));
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && drawer.classList.contains('open')) { closeDrawer(); menuBtn.focus(); }
  });

  // ---- the composer ----
  function syncComposer() {
    input.disabled = !me;
    askBtn.disabled = !me;
    askBtn.textContent = link.up || !me ? 'Ask' : 'Ask later';
    askBtn.title = link.up ? '' : 'Offline: the question waits on this device and goes when the link returns';
  }
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = '';
    clearTimeout(typingTimer);
    clearHints();
    lastTyped = '';
    ask(text);
  });

  // Questions this device still holds for this conversation (typed offline, or answers that
  // were running when the page closed): their cards come back and go on.
  function restorePending() {
    const all = pending();
    const mine = Object.entries(all).filter(([, p]) => p.session === session || (!p.session && !session))
      .sort((a, b) => a[1].at - b[1].at);
    for (const [id, p] of mine) {
      if (reqs.has(id)) continue;
      const r = makeCard(id, p.text, p.kbs, session);
      r.sent = !!p.sent;
      r.at = p.at;
      setStatus(r, p.sent ? 'lost' : 'waiting', p.sent ? 'Resuming…'
        : 'Waiting for the connection: it will be sent when the link returns');
    }
    if (mine.length) hideWelcome();
  }

  // ---- signing in ----
  async function checkSignIn() {
    let r;
    try { r = await fetch('/api/me', { credentials: 'same-origin' }); } catch (e) { r = null; }
    if (r && r.status === 401) { showLogin(''); return; }
    if (r && r.ok) me = await r.json();
    else if (r && r.status === 404) me = { user: 'local', role: 'admin', via: 'none' }; // no sign-in here
    else me = me || device.get('me', null) || { user: '', role: 'user', via: 'offline' };
    device.set('me', me);
    showApp();
  }
  function showLogin(message) {
    me = null;
    link.stop();
    loginForm.hidden = false;
    form.hidden = true;
    logoutBtn.hidden = docsBtn.hidden = true;
    setConn('down', 'Signed out');
    showNotice(message);
    syncComposer();
    $('#login-name').focus();
  }
  function showApp() {
    loginForm.hidden = true;
    form.hidden = false;
    logoutBtn.hidden = !me || me.via !== 'cookie';
    docsBtn.hidden = !me || me.role !== 'admin';
    if (me && me.user) conn.title = 'Signed in as ' + me.user;
    syncComposer();
    link.start();
    loadExamples();
    loadConversations();
  }
  loginForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    const name = $('#login-name').value, password = $('#login-password').value;
    let r;
    try {
      r = await fetch('/api/login', { method: 'POST', credentials: 'same-origin',
        headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ name, password }) });
    } catch (err) { showNotice('The appliance cannot be reached.'); return; }
    $('#login-password').value = '';
    if (r.ok) { showNotice(''); checkSignIn(); return; }
    let body = {};
    try { body = await r.json(); } catch (err) { /* not JSON */ }
    const error = body.error || {};
    showNotice(error.code === 'rate_limited' ? 'Too many failed sign-ins: wait ' +
      Math.ceil(error.retry_after || 1) + ' s.' : (error.message || 'Sign-in failed.'));
  });
  logoutBtn.addEventListener('click', async () => {
    try { await api('POST', '/api/logout'); } catch (e) { /* signed out here anyway */ }
    device.del('me');
    resetView();
    showLogin('Signed out.');
  });

  // ---- documents (admins) ----
  docsBtn.addEventListener('click', () => {
    const open = adminEl.hidden;
    adminEl.hidden = !open;
    docsBtn.setAttribute('aria-expanded', String(open));
    if (open) K.admin.open(adminEl, { api, csrf }); else K.admin.close();
  });

  // ---- start ----
  const params = new URLSearchParams(location.search);
  const asked = params.get('q');
  // ?c=ID opens that conversation (another device of the same user continues it there).
  if (params.get('c')) setSession(params.get('c'));
  if (asked || params.get('c')) history.replaceState(null, '', location.pathname); // once
  restorePending();
  updateTitle();
  checkSignIn().then(() => { if (asked && asked.trim() && me) ask(asked); });
  if ('serviceWorker' in navigator && window.isSecureContext)
    navigator.serviceWorker.register('/static/sw.js', { scope: '/' }).catch(() => { /* optional */ });
  K.ready = true;
  if (window.edgekbBooted) window.edgekbBooted();
})();
