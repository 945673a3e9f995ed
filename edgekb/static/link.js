// The WebSocket link of protocol edgekb.v2: connect, notice a dead link, reconnect with backoff
// and jitter. It moves frames and knows nothing of requests: app.js resumes them on `welcome`.
'use strict';
(() => {
  const PING_EVERY = 15000, PONG_WAIT = 10000;
  const FIRST_DELAY = 1000, MAX_DELAY = 30000;

  // hooks: url() -> string, welcome(m), event(m), state(name, text), unauthorized()
  function Link(hooks) {
    let ws = null, attempt = 0, retryTimer = 0, pingTimer = 0, deadTimer = 0, rx = 0;
    let stopped = true, retryAt = 0, countdown = 0, refusals = 0;

    function state(name, text) { hooks.state(name, text); }

    function connect() {
      clearTimeout(retryTimer); retryTimer = 0;
      clearInterval(countdown); countdown = 0;
      if (ws || stopped) return;
      state('connecting', 'Connecting…');
      let s;
      try { s = new WebSocket(hooks.url(), ['edgekb.v2']); } catch (e) { retry(); return; }
      ws = s;
      s.onopen = () => { rx++; refusals = 0; s.opened = true; startPing(); };
      s.onmessage = (ev) => {
        rx++;
        let m;
        try { m = JSON.parse(ev.data); } catch (e) { return; }
        if (!m || typeof m.type !== 'string') return;
        if (m.type === 'welcome') { attempt = 0; state('up', 'Connected'); hooks.welcome(m); return; }
        hooks.event(m);
      };
      s.onclose = (ev) => {
        if (s !== ws) return;
        drop(s);
        if (ev.code === 4001) { hooks.unauthorized(); return; }
        if (ev.code === 4004) { hooks.takenOver(); } // another tab took our client id
        // A handshake refused with 401 looks like any failed connect to a script: after two
        // in a row, ask the server who we are (the sign-in may have ended).
        if (!s.opened && ++refusals === 2) hooks.unauthorized();
        retry();
      };
    }

    // Forget a socket at once: a half-dead socket's close handshake can take minutes on a
    // phone, and the page does not wait for it.
    function drop(s) {
      ws = null;
      s.onopen = s.onmessage = s.onclose = null;
      try { s.close(); } catch (e) { /* already closed */ }
      stopPing();
      hooks.lost();
    }

    // Exponential backoff with equal jitter: many pages that lost the same access point do
    // not all come back in the same second.
    function retry() {
      if (retryTimer || ws || stopped) return;
      const base = Math.min(MAX_DELAY, FIRST_DELAY * 2 ** Math.min(attempt, 10));
      const wait = base / 2 + Math.random() * base / 2;
      attempt++;
      retryAt = Date.now() + wait;
      const show = () => state('down', 'Offline · retrying in ' +
        Math.max(1, Math.ceil((retryAt - Date.now()) / 1000)) + ' s');
      show();
      countdown = setInterval(show, 1000);
      retryTimer = setTimeout(connect, wait);
    }

    // The network came back, the phone woke up, or the user acts: do not sit out the backoff.
    function kick() {
      if (stopped) return;
      if (ws) { ping(); return; }
      attempt = 0;
      connect();
    }

    function startPing() { stopPing(); pingTimer = setInterval(ping, PING_EVERY); }
    function stopPing() {
      clearInterval(pingTimer); clearTimeout(deadTimer); pingTimer = deadTimer = 0;
    }
    // Browsers cannot send protocol pings, so the page sends {"type":"ping"}. Any inbound frame
    // counts as life: on a slow link the pong may queue behind answer deltas.
    function ping() {
      if (deadTimer || !send({ type: 'ping' })) return;
      const seen = rx, s = ws;
      deadTimer = setTimeout(() => {
        deadTimer = 0;
        if (rx === seen && ws === s) { drop(s); retry(); }
      }, PONG_WAIT);
    }

    function send(obj) {
      if (!ws || ws.readyState !== 1) return false;
      ws.send(JSON.stringify(obj));
      return true;
    }

    window.addEventListener('online', kick);
    document.addEventListener('visibilitychange', () => { if (!document.hidden) kick(); });

    return {
      start() { stopped = false; connect(); },
      stop() { stopped = true; clearTimeout(retryTimer); retryTimer = 0; if (ws) drop(ws); },
      // Reconnect now (to another session, say): the next welcome says where we are.
      restart() { if (ws) drop(ws); attempt = 0; stopped = false; connect(); },
      kick, send,
      get up() { return !!ws && ws.readyState === 1; },
    };
  }

  window.edgekb = window.edgekb || {};
  window.edgekb.Link = Link;
})();
