// Service worker: keeps the page's shell so a reload on a dying link still opens (and then
// retries the link itself). Network first, so an upgraded appliance serves its new page at once;
// a response is used only once its whole body arrived (a transfer cut half-way is an error
// here, not a truncated script), else the last complete copy is served. Only the shell: /api and
// /ws never pass through here. Browsers run service workers on https and on localhost only; on
// plain http the inline guard in index.html retries instead.
'use strict';
const CACHE = 'edgekb-shell-v2';
const SHELL = ['/', '/static/style.css', '/static/markdown.js', '/static/link.js',
  '/static/app.js', '/static/admin.js'];
const NETWORK_WAIT_MS = 4000;

self.addEventListener('install', (event) => {
  event.waitUntil(caches.open(CACHE).then((c) => c.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener('activate', (event) => {
  event.waitUntil(caches.keys()
    .then((names) => Promise.all(names.filter((n) => n !== CACHE).map((n) => caches.delete(n))))
    .then(() => self.clients.claim()));
});

// The whole body, or an error: arrayBuffer() rejects when the connection is cut mid-body.
async function complete(request) {
  const response = await fetch(request, { cache: 'no-store' });
  if (!response.ok) throw new Error('HTTP ' + response.status);
  const body = await response.clone().arrayBuffer();
  const length = response.headers.get('Content-Length');
  if (length !== null && Number(length) !== body.byteLength) throw new Error('short body');
  return response;
}

self.addEventListener('fetch', (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== 'GET' || url.origin !== self.location.origin) return;
  const key = url.pathname === '/' ? '/' : url.pathname;
  if (!SHELL.includes(key)) return;
  event.respondWith((async () => {
    const cache = await caches.open(CACHE);
    const network = complete(event.request).then(async (response) => {
      await cache.put(key, response.clone());
      return response;
    });
    network.catch(() => { /* reported through the race below */ });
    const timeout = new Promise((resolve) => setTimeout(resolve, NETWORK_WAIT_MS, null));
    try {
      const first = await Promise.race([network, timeout]);
      if (first) return first;
    } catch (e) { /* cut or refused: the cached copy below */ }
    const cached = await cache.match(key);
    if (cached) return cached;
    return network; // nothing cached yet: wait for the network (or its error)
  })());
});
