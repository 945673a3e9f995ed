// The documents view (admins): what the appliance is doing in words, the knowledge bases and
// their documents, upload with progress (bytes sent, then one line per file as the server
// ingests it: its NDJSON stream), delete and reindex. Text enters the page as text nodes only.
'use strict';
(() => {
  const ACCEPT = '.pdf,.docx,.txt,.text,.md,.markdown,.html,.htm';
  let root = null, http = null, timer = 0;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = String(text);
    return e;
  }
  function button(cls, text, onClick, label) {
    const b = el('button', cls, text);
    b.type = 'button';
    if (label) b.setAttribute('aria-label', label);
    b.addEventListener('click', onClick);
    return b;
  }
  const plural = (n, one, many) => n + ' ' + (n === 1 ? one : many || one + 's');

  // /api/status in words.
  function describe(s) {
    const parts = [];
    parts.push(s.llm === 'answering' ? 'The model is answering a question'
      : s.llm === 'pre-reading' ? 'The model is preparing follow-up questions' : 'The model is idle');
    if (s.queued) parts[0] += '; ' + plural(s.queued, 'more question') + ' waiting';
    if (Number.isFinite(s.connections)) parts.push(plural(s.connections, 'device') + ' connected');
    const st = s.storage || {};
    if (Number.isFinite(st.free_mb)) {
      const free = st.free_mb >= 1024 ? (st.free_mb / 1024).toFixed(1) + ' GB' : Math.round(st.free_mb) + ' MB';
      parts.push(st.ok ? 'Data disk: ' + free + ' free'
        : 'Data disk nearly full: ' + free + ' free, under the ' + st.floor_mb + ' MB floor: new questions are refused');
    }
    return parts.join('. ') + '.';
  }

  async function showStatus() {
    const line = root && root.querySelector('.status');
    if (!line) return;
    try { line.textContent = describe(await http.api('GET', '/api/status')); } catch (e) {
      line.textContent = 'Status unavailable: ' + e.message;
    }
  }

  // POST with XMLHttpRequest: it reports upload progress, and its responseText grows as the
  // NDJSON lines arrive, so each file's result shows as soon as it is ingested.
  function stream(url, body, log, bar) {
    return new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      let seen = 0, failed = 0, summary = null;
      const take = () => {
        const text = xhr.responseText || '';
        let nl;
        while ((nl = text.indexOf('\n', seen)) >= 0) {
          const line = text.slice(seen, nl);
          seen = nl + 1;
          let m;
          try { m = JSON.parse(line); } catch (e) { continue; }
          if (m.type === 'file') {
            const name = String(m.path || '').split('/').pop();
            const ok = m.status !== 'failed';
            if (!ok) failed++;
            log.append(el('li', ok ? 'ok' : 'err', ok ? m.status + ': ' + name + ' (' +
              plural(m.chunks, 'chunk') + ')' : 'failed: ' + name + ': ' + (m.error || m.code)));
          } else if (m.type === 'summary') {
            summary = m;
          } else if (m.type === 'error') {
            failed++;
            log.append(el('li', 'err', 'error: ' + (m.message || m.code)));
          }
        }
      };
      xhr.open('POST', url);
      xhr.setRequestHeader('X-CSRF-Token', http.csrf());
      xhr.upload.onprogress = (e) => {
        if (!e.lengthComputable || !bar) return;
        bar.hidden = false;
        bar.value = e.loaded / e.total;
        bar.nextSibling.textContent = e.loaded < e.total
          ? 'Uploading ' + Math.round(100 * e.loaded / e.total) + ' %' : 'Ingesting…';
      };
      xhr.onprogress = take;
      xhr.onload = () => {
        if (xhr.status >= 400) {
          let msg = 'HTTP ' + xhr.status;
          try { msg = JSON.parse(xhr.responseText).error.message; } catch (e) { /* not JSON */ }
          log.append(el('li', 'err', msg));
          resolve(false);
          return;
        }
        take();
        if (summary) {
          const words = ['added', 'updated', 'unchanged', 'removed', 'failed']
            .filter((k) => summary[k]).map((k) => summary[k] + ' ' + k);
          log.append(el('li', summary.failed ? 'err' : 'ok', 'Done: ' + (words.join(', ') || 'nothing changed')));
        }
        resolve(!failed);
      };
      xhr.onerror = () => { log.append(el('li', 'err', 'The connection failed; the upload did not finish.')); resolve(false); };
      xhr.send(body);
    });
  }

  function build() {
    root.replaceChildren();
    root.append(el('h2', '', 'Documents'));
    const status = el('p', 'status', 'Reading the status…');
    status.dataset.testid = 'admin-status';
    status.setAttribute('aria-live', 'polite');
    root.append(status);

    const form = el('form', 'upload');
    form.dataset.testid = 'upload';
    const kbLabel = el('label', '', 'Knowledge base ');
    const kb = el('input');
    kb.name = 'kb'; kb.value = 'default'; kb.required = true; kb.pattern = '[a-z0-9][a-z0-9_-]{0,31}';
    kb.title = '1-32 of a-z 0-9 _ -';
    kbLabel.append(kb);
    const fileLabel = el('label', '', 'Files ');
    const files = el('input');
    files.type = 'file'; files.multiple = true; files.accept = ACCEPT; files.required = true;
    files.dataset.testid = 'upload-files';
    fileLabel.append(files);
    const send = el('button', '', 'Upload');
    send.type = 'submit';
    send.dataset.testid = 'upload-submit';
    const bar = el('progress');
    bar.max = 1; bar.hidden = true;
    const barText = el('span', 'muted');
    const log = el('ul', 'log');
    log.dataset.testid = 'upload-log';
    form.append(kbLabel, fileLabel, send, bar, barText, log);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (!files.files.length) return;
      const body = new FormData();
      for (const f of files.files) body.append('file', f, f.name);
      send.disabled = true;
      log.replaceChildren();
      await stream('/api/kbs/' + encodeURIComponent(kb.value) + '/documents', body, log, bar);
      send.disabled = false;
      bar.hidden = true;
      barText.textContent = '';
      files.value = '';
      listKbs();
    });
    root.append(form);
    const kbs = el('div', 'kbs');
    kbs.dataset.testid = 'kb-list';
    root.append(kbs);
  }

  async function listKbs() {
    const box = root && root.querySelector('.kbs');
    if (!box) return;
    let kbs;
    try { kbs = (await http.api('GET', '/api/kbs')).kbs || []; } catch (e) {
      box.replaceChildren(el('p', 'err', e.message));
      return;
    }
    box.replaceChildren();
    if (!kbs.length) box.append(el('p', 'muted', 'No documents yet: upload some above.'));
    for (const kb of kbs) {
      const section = el('section', 'kb');
      const head = el('h3', '', kb.name + ' ');
      head.append(el('small', 'muted', plural(kb.documents, 'document') + ', ' + plural(kb.chunks, 'chunk')));
      const log = el('ul', 'log');
      const reindex = button('plain', 'Reindex', async () => {
        reindex.disabled = true;
        log.replaceChildren(el('li', 'muted', 'Reindexing…'));
        await stream('/api/kbs/' + encodeURIComponent(kb.name) + '/reindex', null, log, null);
        await loadDocs(); // a reindexed document is stored anew, under a new id
        reindex.disabled = false;
      }, 'Reindex ' + kb.name);
      section.append(head, reindex, log);
      const list = el('ul', 'docs');
      section.append(list);
      box.append(section);
      const loadDocs = () => http.api('GET', '/api/kbs/' + encodeURIComponent(kb.name) + '/documents').then((d) => {
        list.replaceChildren();
        for (const doc of d.documents || []) {
          const li = el('li');
          li.append(el('span', 'doc-title', doc.title || doc.name),
            el('small', 'muted', ' ' + doc.name + ' · ' + plural(doc.chunks, 'chunk')));
          li.append(button('plain', 'Delete', async () => {
            if (!confirm('Delete ' + doc.name + ' from ' + kb.name + '?')) return;
            try { await http.api('DELETE', '/api/kbs/' + encodeURIComponent(kb.name) + '/documents/' + doc.id); } catch (e) {
              log.replaceChildren(el('li', 'err', e.message));
            }
            listKbs();
          }, 'Delete ' + doc.name));
          list.append(li);
        }
      }).catch((e) => list.replaceChildren(el('li', 'err', e.message)));
      loadDocs();
    }
  }

  window.edgekb = window.edgekb || {};
  window.edgekb.admin = {
    open(container, deps) {
      root = container; http = deps;
      build(); showStatus(); listKbs();
      clearInterval(timer);
      timer = setInterval(showStatus, 5000);
    },
    close() { clearInterval(timer); timer = 0; },
  };
})();
