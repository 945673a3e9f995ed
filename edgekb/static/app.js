// edgekb web client: protocol edgekb.v2 over one WebSocket. No dependencies, no build step.
// Server text is only ever put into the page with textContent / text nodes (no innerHTML).
'use strict';
(() => {
  const $ = (s) => document.querySelector(s);
  const form = $('#ask-form'), input = $('#q'), stopBtn = $('#stop'),
    conn = $('#conn'), cards = $('#cards'), notice = $('#notice'),
    loginForm = $('#login-form'), logoutBtn = $('#logout');
  const PING_EVERY = 15000, PONG_WAIT = 10000, MAX_DELAY = 15000;
  const STAGES = { retrieving: 'Searching the manuals…', reading: 'Reading sources…',
    generating: 'Writing the answer…' };
  let ws = null, delay = 1000, retryTimer = 0, pingTimer = 0, deadTimer = 0, rx = 0;
  let maxBytes = 65536, canResume = false, n = 0, historyShown = false;
  // The session is the conversation: kept across reloads, so the page continues it.
  let session = localStorage.getItem('edgekb.session') || '';
  const reqs = new Map(); // id -> request state (one card each)
  const outbox = [];      // ids to send once the socket is open

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = String(text);
    return e;
  }
  function setConn(state, text) { conn.dataset.state = state; conn.textContent = text; }
  function showNotice(text) { notice.textContent = text; notice.hidden = !text; }
  function send(obj) {
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(obj));
    return true;
  }

  // ---- signing in: the server sets an HttpOnly cookie (script never sees the token) and
  // returns a CSRF token, also kept in a readable cookie, that state-changing requests echo.
  let signedIn = false, failures = 0;
  function csrf() {
    const m = document.cookie.match(/(?:^|; )edgekb_csrf=([^;]*)/);
    return m ? decodeURIComponent(m[1]) : '';
  }
  function showLogin(message) {
    signedIn = false;
    if (ws) { const s = ws; ws = null; s.onopen = s.onmessage = s.onclose = null; s.close(); }
    stopPing(); clearTimeout(retryTimer); retryTimer = 0;
    loginForm.hidden = false; form.hidden = true; logoutBtn.hidden = true;
    setConn('down', 'Signed out');
    showNotice(message || '');
    $('#login-name').focus();
  }
  function showApp(me) {
    signedIn = true; failures = 0;
    loginForm.hidden = true; form.hidden = false;
    logoutBtn.hidden = !me || me.via !== 'cookie';
    if (me && me.user) conn.title = 'Signed in as ' + me.user;
    showNotice('');
    connect();
  }
  // Who am I? 200: connect; 401: the login screen. A server that cannot be reached is retried.
  async function checkSession() {
    try {
      const r = await fetch('/api/me', { credentials: 'same-origin' });
      if (r.status === 401) { showLogin(''); return false; }
      if (r.ok) { showApp(await r.json()); return true; }
    } catch (e) { /* offline: fall through to a retry */ }
    setConn('down', 'Server unreachable');
    retryTimer = setTimeout(checkSession, Math.min(delay *= 2, MAX_DELAY));
    return false;
  }
  loginForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    const name = $('#login-name').value, password = $('#login-password').value;
    let r;
    try {
      r = await fetch('/api/login', { method: 'POST', credentials: 'same-origin',
        headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ name, password }) });
    } catch (err) { showNotice('The server cannot be reached.'); return; }
    $('#login-password').value = '';
    if (r.ok) { showApp(await r.json()); return; }
    let body = {};
    try { body = await r.json(); } catch (err) { /* not JSON */ }
    const error = body.error || {};
    showNotice(error.code === 'rate_limited' ? 'Too many failed sign-ins: wait ' +
      Math.ceil(error.retry_after || 1) + ' s.' : (error.message || 'Sign-in failed.'));
  });
  logoutBtn.addEventListener('click', async () => {
    try {
      await fetch('/api/logout', { method: 'POST', credentials: 'same-origin',
        headers: { 'X-CSRF-Token': csrf() } });
    } catch (e) { /* signed out locally anyway */ }
    showLogin('Signed out.');
  });

  // ---- connection, reconnect with backoff, app-level heartbeat ----
  function connect() {
    clearTimeout(retryTimer); retryTimer = 0;
    if (ws || !signedIn) return;
    setConn('connecting', 'Connecting…');
    const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws' +
      (session ? '?session=' + encodeURIComponent(session) : '');
    let s;
    try { s = new WebSocket(url, ['edgekb.v2']); } catch (e) { scheduleRetry(); return; }
    ws = s;
    s.onopen = () => { rx++; failures = 0; setConn('up', 'Connected'); startPing(); flush(); };
    s.onmessage = (ev) => {
      rx++;
      let m;
      try { m = JSON.parse(ev.data); } catch (e) { return; }
      if (m && typeof m.type === 'string') onEvent(m);
    };
    s.onclose = (ev) => {
      // 4001: the login ended (expired, revoked). A handshake refused with 401 shows as 1006
      // to scripts: after a few failed attempts in a row, ask the server who we are.
      if (ev.code === 4001 || (!s.opened && ++failures >= 2)) {
        if (s === ws) { ws = null; stopPing(); }
        checkSession();
        return;
      }
      lost(s);
    };
    s.addEventListener('open', () => { s.opened = true; });
  }

  // Called on close and on a dead link. Detach the old socket at once: a half-dead socket's
  // close handshake can take minutes on a phone, and we do not wait for it.
  function lost(s) {
    if (s !== ws) return;
    ws = null;
    s.onopen = s.onmessage = s.onclose = null;
    try { s.close(); } catch (e) { /* already closed */ }
    stopPing();
    for (const r of reqs.values()) {
      if (!r.active || !r.sent) continue;
      r.sent = false;
      if (canResume) { r.resume = true; outbox.push(r.id); setStatus(r, 'lost', 'Connection lost, will resume…'); }
      else end(r, 'Connection lost before the answer finished.', true);
    }
    scheduleRetry();
  }

  function scheduleRetry() {
    if (retryTimer || ws) return;
    const d = delay;
    delay = Math.min(delay * 2, MAX_DELAY);
    setConn('down', 'Reconnecting in ' + Math.round(d / 1000) + ' s…');
    retryTimer = setTimeout(connect, d);
  }
  // The network came back or the phone woke up: do not sit out the backoff.
  function kick() {
    if (ws) { ping(); return; }
    if (retryTimer) { delay = 1000; connect(); }
  }
  window.addEventListener('online', kick);
  document.addEventListener('visibilitychange', () => { if (!document.hidden) kick(); });

  function startPing() { stopPing(); pingTimer = setInterval(ping, PING_EVERY); }
  function stopPing() { clearInterval(pingTimer); clearTimeout(deadTimer); pingTimer = deadTimer = 0; }
  // Browsers cannot send protocol pings, so we send {"type":"ping"}. Any inbound frame counts
  // as life, not only the pong: on a slow link the pong may be queued behind answer deltas,
  // and a busy link must not be mistaken for a dead one.
  function ping() {
    if (deadTimer || !send({ type: 'ping' })) return;
    const seen = rx, s = ws;
    deadTimer = setTimeout(() => {
      deadTimer = 0;
      if (rx === seen && ws === s) lost(s);
    }, PONG_WAIT);
  }

  // ---- requests ----
  function ask(text) {
    const id = 'r' + (++n) + '-' + Date.now().toString(36);
    const r = makeCard(id, text);
    reqs.set(id, r);
    const size = new TextEncoder().encode(JSON.stringify({ type: 'ask', id, text })).length;
    if (size > maxBytes) { end(r, 'too_large: the question is longer than the server accepts.'); return; }
    outbox.push(id);
    setStatus(r, 'waiting', 'Waiting for connection…');
    if (!ws) kick(); // the user is here now: do not wait out the backoff
    flush();
    syncStop();
  }

  function flush() {
    while (outbox.length && ws && ws.readyState === 1) {
      const r = reqs.get(outbox.shift());
      if (!r || !r.active) continue;
      send(r.resume ? { type: 'resume', id: r.id, after: r.seq } : { type: 'ask', id: r.id, text: r.text });
      r.sent = true;
      if (!r.resume) setStatus(r, 'sent', 'Sent…');
    }
  }

  function syncStop() {
    let any = false;
    for (const r of reqs.values()) if (r.active) any = true;
    stopBtn.disabled = !any;
  }

  function makeCard(id, text) {
    const card = el('article', 'card'), st = el('div', 'st'), stText = el('span');
    card.dataset.id = id;
    st.dataset.testid = 'status';
    const bar = el('progress');
    bar.max = 1; bar.hidden = true;
    st.append(stText, bar);
    const src = el('ol', 'src'), ans = el('div', 'ans'), body = document.createTextNode('');
    src.dataset.testid = 'sources';
    ans.dataset.testid = 'answer';
    ans.append(body);
    ans.setAttribute('aria-busy', 'true');
    card.append(el('h2', 'q', text), st, src, ans);
    cards.prepend(card);
    return { id, text, card, st, stText, bar, src, ans, body, seq: 0, active: true, sent: false, resume: false };
  }

  // key: a stable name for tests and styling (data-stage); text: what the user reads.
  function setStatus(r, key, text, progress) {
    r.stText.textContent = text;
    r.st.dataset.stage = key;
    const p = Number(progress);
    r.bar.hidden = !(progress != null && isFinite(p));
    if (!r.bar.hidden) r.bar.value = Math.max(0, Math.min(1, p));
  }

  // Finish a request. With `err`, show it inline; with `again`, offer to ask again.
  function end(r, err, again) {
    r.active = false;
    r.ans.setAttribute('aria-busy', 'false');
    r.bar.hidden = true;
    if (err) {
      setStatus(r, 'error', 'Failed');
      r.card.append(el('p', 'err', err));
      if (again) {
        const b = el('button', 'again', 'Ask again');
        b.type = 'button';
        b.onclick = () => { b.remove(); ask(r.text); };
        r.card.append(b);
      }
    }
    syncStop();
  }

  function renderSources(r, list) {
    r.src.textContent = '';
    for (const s of Array.isArray(list) ? list : []) addSource(r, s);
  }

  function addSource(r, s) {
    if (!s || typeof s !== 'object') return;
    const li = el('li'), d = el('details'), sum = el('summary');
    sum.append('[' + (s.n != null ? s.n : r.src.children.length + 1) + '] ',
      el('b', '', s.title || s.doc || 'Untitled'));
    if (s.where) sum.append(el('span', 'w', ' — ' + s.where));
    if (s.relevance) sum.append(el('span', 'sc', ' · ' + s.relevance));
    d.append(sum);
    if (s.doc && s.doc !== s.title) d.append(el('p', '', s.doc));
    if (s.snippet) d.append(el('p', '', s.snippet));
    li.append(d);
    r.src.append(li);
  }

  // Earlier turns of a continued session, as finished cards under the new ones.
  function showHistory(turns) {
    if (!Array.isArray(turns)) return;
    for (const t of [...turns].reverse()) { // newest first, like the live cards
      if (!t || reqs.has(t.id)) continue;
      const r = makeCard(t.id, t.question || '');
      cards.append(r.card); // older than anything asked on this page
      renderSources(r, t.sources);
      r.body.data = String(t.answer || '');
      setStatus(r, 'history', t.finish === 'stop' || t.finish === 'length' ? 'Earlier answer'
        : 'Earlier answer (' + t.finish + ')');
      r.active = false;
      r.ans.setAttribute('aria-busy', 'false');
    }
  }

  function fmtMs(ms) { return ms >= 1000 ? (ms / 1000).toFixed(1) + ' s' : Math.round(ms) + ' ms'; }

  function onDone(r, m) {
    // The deltas add up to the answer: done says how long it is (nothing lost, nothing twice).
    if (Number.isFinite(m.chars) && m.chars !== r.body.data.length)
      r.card.append(el('p', 'err', 'Part of this answer was lost on the way; ask again.'));
    const f = m.finish;
    if (f === 'cancelled') setStatus(r, 'cancelled', 'Stopped');
    else if (f === 'length') setStatus(r, 'length', 'Done (length limit reached)');
    else setStatus(r, 'done', 'Done');
    const t = m.timings || {}, u = m.usage || {}, bits = [];
    if (Number.isFinite(t.ttft_ms)) bits.push('first token ' + fmtMs(t.ttft_ms));
    if (Number.isFinite(t.tokens_per_s)) bits.push(t.tokens_per_s.toFixed(1) + ' tokens/s');
    if (Number.isFinite(t.total_ms)) bits.push('total ' + fmtMs(t.total_ms));
    if (Number.isFinite(u.completion_tokens)) bits.push(u.completion_tokens + ' tokens');
    if (bits.length) r.card.append(el('div', 'meta', bits.join(' · ')));
    end(r);
  }

  function onEvent(m) {
    const t = m.type;
    if (t === 'welcome') {
      delay = 1000; // a server that answers is back: next outage starts at 1 s again
      const lim = m.limits || {};
      if (lim.max_message_bytes > 0) maxBytes = lim.max_message_bytes;
      canResume = !!m.session; // every request of a session can be resumed
      if (m.session && m.session !== session) {
        session = m.session;
        try { localStorage.setItem('edgekb.session', session); } catch (e) { /* private mode */ }
      }
      if (m.resumed && !historyShown) { historyShown = true; send({ type: 'history', limit: 20 }); }
      if (m.server) conn.title = String(m.server);
      showNotice('');
      return;
    }
    if (t === 'pong') return;
    if (t === 'history') { showHistory(m.turns); return; }
    if (t === 'notice') { showNotice(String(m.message || m.text || '')); return; }
    const r = m.id != null ? reqs.get(m.id) : undefined;
    if (t === 'error' && !r) { showNotice('Error ' + m.code + ': ' + (m.message || '')); return; }
    if (!r || !r.active) return;
    if (typeof m.seq === 'number') { // nothing twice, e.g. after a resume
      if (m.seq <= r.seq) return;
      r.seq = m.seq;
    }
    switch (t) {
      case 'queued':
        setStatus(r, 'queued', m.position > 0
          ? 'Queued: ' + m.position + (m.position === 1 ? ' answer' : ' answers') + ' ahead'
          : 'Starting…');
        break;
      case 'status':
        setStatus(r, String(m.stage), STAGES[m.stage] || String(m.stage),
          m.stage === 'reading' ? m.progress : null);
        break;
      case 'source':
        addSource(r, m);
        break;
      case 'delta':
        if (typeof m.text !== 'string') break;
        const k = r.st.dataset.stage;
        if (k !== 'generating' && k !== 'stopping') setStatus(r, 'generating', STAGES.generating);
        r.body.appendData(m.text);
        break;
      case 'done':
        onDone(r, m);
        break;
      case 'error': {
        let msg = (m.code || 'error') + ': ' + (m.message || '');
        if (m.retry_after != null) msg += ' (retry in ' + m.retry_after + ' s)';
        end(r, msg, m.code === 'busy' || m.code === 'rate_limited' || m.code === 'internal');
        break;
      }
      default: // unknown types are ignored (forward compatibility)
    }
  }

  // ---- UI ----
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = '';
    ask(text);
  });
  stopBtn.addEventListener('click', () => {
    for (const r of reqs.values()) {
      if (!r.active) continue;
      if (r.sent && send({ type: 'cancel', id: r.id })) { setStatus(r, 'stopping', 'Stopping…'); continue; }
      const i = outbox.indexOf(r.id);
      if (i >= 0) outbox.splice(i, 1);
      setStatus(r, 'cancelled', 'Stopped');
      end(r);
    }
  });

  const q = new URLSearchParams(location.search).get('q');
  if (q && q.trim()) ask(q.trim()); // sent as soon as the socket opens
  checkSession();
})();
