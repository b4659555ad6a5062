// The Node test app: Node's own `http` module, with its default keep-alive behaviour (only
// the idle timeout is shortened, from APP_KEEP_ALIVE_MS), serving the endpoints and the
// execution log of wsgi_app.py. See README.md beside this file.
'use strict';

const fs = require('fs');
const http = require('http');

const execLog = fs.openSync(process.env.APP_EXEC_LOG, 'a');
const allowedHosts = (process.env.ALLOWED_HOSTS || '')
  .split(',')
  .map((h) => h.trim())
  .filter((h) => h);
const postResponseMs = Number(process.env.APP_POST_RESPONSE_MS || '2');

function field(value) {
  // One log line is split on spaces, so a value never contains one.
  return String(value || '').replace(/\s+/g, '') || '-';
}

function record(method, target, key, host, status) {
  // An 'a' file is opened O_APPEND, and one writeSync of a short line is one write().
  fs.writeSync(
    execLog,
    `${field(method)} ${field(target)} ${field(key)} ${field(host)} ${status} ${process.pid}\n`,
  );
}

function hostAllowed(host) {
  if (allowedHosts.length === 0) return true;
  const name = host.endsWith(']') ? host : host.replace(/:[^:]*$/, '');
  return allowedHosts.includes(name);
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const url = new URL(req.url, 'http://app');
    const query = url.search.replace(/^\?/, '');
    const key = req.headers['idempotency-key'] || '';
    const host = req.headers.host || '';
    const body = Buffer.concat(chunks).toString('utf8');
    const endpoint = url.pathname.replace(/\/+$/, '').split('/').pop();

    let status = 404;
    if (!hostAllowed(host)) status = 400;
    else if (['healthz', 'work', 'slow'].includes(endpoint)) status = 200;
    // Recorded before the work, so an execution still running counts too.
    record(req.method, req.url, key, host, status);

    const respond = (payload) => {
      const data = Buffer.from(JSON.stringify(payload));
      res.writeHead(status, {
        'Content-Type': 'application/json',
        'Content-Length': data.length,
      });
      res.end(data);
      // Work after the response, as Django's request_finished handlers do; Node keeps the
      // connection open meanwhile.
      setTimeout(() => {}, postResponseMs);
    };
    const work = () => ({
      method: req.method,
      path: url.pathname,
      query,
      key,
      body,
      pid: process.pid,
    });
    if (status === 400) respond({ error: 'DisallowedHost', host });
    else if (status === 404) respond({ error: 'no such endpoint', path: url.pathname });
    else if (endpoint === 'healthz') respond({ ok: true });
    else if (endpoint === 'slow') {
      const ms = Number(url.searchParams.get('ms') || '1500');
      setTimeout(() => respond(work()), ms);
    } else respond(work());
  });
});

server.keepAliveTimeout = Number(process.env.APP_KEEP_ALIVE_MS || '5000');
// The inherited listening socket (tests/it/support/appserver.rs creates it).
server.listen({ fd: Number(process.env.APP_LISTEN_FD) });
