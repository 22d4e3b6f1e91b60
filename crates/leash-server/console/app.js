// Leash web console (API §13): plain ES2020, no framework, no build step, no external assets.
// The server embeds this file and serves it at /console/assets/app.js under a CSP of
// `script-src 'self'` (no inline script, no eval, no style attributes).
//
// SECURITY (ATTACKS 53) — read before changing anything:
// * Every string that an agent, an upstream, an MCP server or another API caller may have written
//   (paths, queries, headers, bodies, tool arguments, purposes, agent ids and names, elicitation
//   messages, audit reasons, error descriptions...) is shown as TEXT only. The DOM is built with
//   document.createElement + text nodes (el() and vis() below). This file never uses innerHTML,
//   outerHTML, insertAdjacentHTML, document.write, eval, new Function or string timers.
// * No URL is built from such strings: the only links are fixed hash routes and the fixed login
//   path (el() refuses any other href and every on*/src/style attribute). An id put into an API
//   path must match ID_RE (see idp()); an agent URI or upstream name goes into a fetch path only
//   through encodeURIComponent.
// * Control characters (C0, C1), Unicode format characters (bidi overrides such as U+202E,
//   zero-width U+200B...), separators and lone surrogates are shown as visible \u{...} escapes,
//   as the CLI does, and long strings wrap.
// * Approval bodies are fetched as bytes and shown as text in a <pre> (never rendered); JSON is
//   re-indented token by token, so numbers and duplicate keys are shown exactly as sent.
// * State-changing calls are fetch() calls (the browser sends Origin; the server checks it).

const ID_RE = /^[a-z]{3}_[A-Za-z0-9_-]+$/;
const INVISIBLE = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Cs}]/gu;
const HIGH_SUFFIXES = ['export', 'delete', 'share', 'grant_privilege', 'create_credential', 'read_secret'];
const BODY_SHOWN_CHARS = 8 * 1024;
const HEX_BYTES = 256;

// ---------------------------------------------------------------------------------------------
// Text and DOM helpers

/** `s` with every invisible or control character written as \u{...} (for plain-text uses). */
function escapeText(s, keep = '') {
  return String(s).replace(INVISIBLE, (c) =>
    keep.includes(c) ? c : `\\u{${c.codePointAt(0).toString(16)}}`);
}

/** A fragment showing `s` as text, its invisible characters as highlighted \u{...} escapes.
 * `keep` lists characters shown as they are (a body keeps its newlines and tabs). */
function vis(s, keep = '') {
  const frag = document.createDocumentFragment();
  if (s === null || s === undefined) {
    frag.append(el('span', { class: 'muted' }, '—'));
    return frag;
  }
  const text = String(s);
  let last = 0;
  for (const m of text.matchAll(INVISIBLE)) {
    if (keep.includes(m[0])) continue;
    if (m.index > last) frag.append(document.createTextNode(text.slice(last, m.index)));
    const esc = document.createElement('span');
    esc.className = 'esc';
    esc.title = 'invisible or control character';
    esc.textContent = `\\u{${m[0].codePointAt(0).toString(16)}}`;
    frag.append(esc);
    last = m.index + m[0].length;
  }
  if (last < text.length) frag.append(document.createTextNode(text.slice(last)));
  return frag;
}

const SAFE_HREF = /^(#\/[a-z/-]*|\/login\?return_to=[A-Za-z0-9%._~-]*)$/;
const FORBIDDEN_PROPS = new Set(['innerHTML', 'outerHTML', 'src', 'srcdoc', 'style', 'action',
  'formaction', 'formAction', 'srcset', 'data', 'xlink:href']);

/** document.createElement with properties and children; strings become text (see vis()). */
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null) continue;
    if (v === false && !(k in node && typeof node[k] === 'boolean')) continue;
    if (/^on/i.test(k) || FORBIDDEN_PROPS.has(k)) throw new Error(`el(): refused property ${k}`);
    if (k === 'class') node.className = v;
    else if (k === 'events') for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else if (k === 'href') {
      if (!SAFE_HREF.test(v)) throw new Error('el(): refused href');
      node.setAttribute('href', v);
    } else if (k in node && typeof node[k] !== 'function' && !k.startsWith('aria')) node[k] = v;
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  add(node, children);
  return node;
}

function add(node, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) add(node, c);
    else if (c instanceof Node) node.append(c);
    else node.append(vis(c));
  }
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

/** An id checked for an API path. */
function idp(id) {
  if (typeof id !== 'string' || !ID_RE.test(id)) throw new Error('unexpected id');
  return id;
}

function mono(s) { return el('code', { class: 'mono' }, s); }
function badge(text, kind) { return el('span', { class: `badge ${kind || ''}` }, text); }
function muted(s) { return el('span', { class: 'muted' }, s); }

// ---------------------------------------------------------------------------------------------
// Times

function parseTime(iso) {
  const t = Date.parse(iso);
  return Number.isFinite(t) ? t : null;
}

function relative(t, now = Date.now()) {
  const s = Math.round((t - now) / 1000);
  const a = Math.abs(s);
  let v;
  if (a < 5) return 'now';
  if (a < 60) v = `${a} s`;
  else if (a < 3600) v = `${Math.round(a / 60)} min`;
  else if (a < 86400) v = `${Math.round(a / 360) / 10} h`.replace('.0 h', ' h');
  else v = `${Math.round(a / 8640) / 10} d`.replace('.0 d', ' d');
  return s > 0 ? `in ${v}` : `${v} ago`;
}

function localTime(t) {
  return new Date(t).toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
}

/** A <time> with local time and a relative one ("in 4 min"), refreshed by refreshTimes(). */
function timeEl(iso) {
  const t = parseTime(iso);
  if (t === null) return iso ? el('span', {}, iso) : muted('—');
  const node = el('time', { class: 'rel', dateTime: new Date(t).toISOString(), title: iso });
  node.dataset.t = String(t);
  fillTime(node, t);
  return node;
}

function fillTime(node, t) {
  clear(node).append(localTime(t), ' ', el('span', { class: 'muted' }, `(${relative(t)})`));
}

function refreshTimes() {
  for (const node of document.querySelectorAll('time.rel')) fillTime(node, Number(node.dataset.t));
}

function countdown(ms) {
  if (ms <= 0) return 'expired';
  const s = Math.floor(ms / 1000);
  if (s >= 86400) return relative(Date.now() + ms);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h} h ${String(m).padStart(2, '0')} min` : `${m}:${ss}`;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

// ---------------------------------------------------------------------------------------------
// API

class ApiError extends Error {
  constructor(status, code, description) {
    super(description || code);
    this.status = status;
    this.code = code;
  }
}

const S = {
  me: null,
  ended: false,
  grants: new Map(),      // id -> grant (the caller's; the admin's: all)
  grantsAt: 0,
  upstreams: null,        // [{name, actions, routes, unlisted_tools}]
  agents: null,           // Map id -> agent, when GET /v1/agents answers (admin)
  users: null,            // Map id -> user (admin)
  approvals: [],          // the last pending list
  approvalsError: null,
  approvalsAt: 0,
  listeners: new Set(),   // called after each approvals poll
  showAll: false,
};

async function api(method, path, body, opts = {}) {
  if (S.ended && !opts.allow401) throw new ApiError(401, 'session', 'the session ended');
  const init = { method, credentials: 'same-origin', cache: 'no-store', headers: { Accept: 'application/json' } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, 'network', `Leash cannot be reached (${e.message})`);
  }
  if (res.status === 401 && !opts.allow401) {
    sessionEnded();
    throw new ApiError(401, 'session', 'your session ended: log in again');
  }
  if (!res.ok) {
    let code = `http_${res.status}`;
    let description = res.statusText || code;
    try {
      const j = await res.json();
      if (j && typeof j.error === 'string') code = j.error;
      if (j && typeof j.error_description === 'string') description = j.error_description;
      else description = code;
    } catch (_) { /* not JSON */ }
    throw new ApiError(res.status, code, description);
  }
  if (opts.raw) return res;
  if (res.status === 204) return null;
  const type = res.headers.get('content-type') || '';
  if (type.includes('json')) return res.json();
  return res.text();
}

/** A one-line error message element: the server's description, its code small. */
function errorLine(e) {
  return el('div', { class: 'error-line', role: 'alert' },
    e instanceof ApiError ? e.message : String(e && e.message ? e.message : e),
    e instanceof ApiError && e.code ? el('span', { class: 'code' }, ` (${e.code})`) : null);
}

async function loadGrants(force = false) {
  if (!force && Date.now() - S.grantsAt < 3000) return;
  S.grantsAt = Date.now();
  const { grants } = await api('GET', '/v1/grants');
  S.grants = new Map(grants.map((g) => [g.id, g]));
}

async function loadUpstreams() {
  if (S.upstreams) return S.upstreams;
  const { upstreams } = await api('GET', '/v1/upstreams');
  S.upstreams = upstreams;
  return upstreams;
}

async function loadAgents(force = false) {
  if (S.agents && !force) return S.agents;
  try {
    const { agents } = await api('GET', '/v1/agents');
    S.agents = new Map(agents.map((a) => [a.id, a]));
  } catch (e) {
    if (e.status === 401) throw e;
    S.agents = new Map();   // only the admin may list agents (API §1): a human types the id
  }
  return S.agents;
}

async function loadUsers(force = false) {
  if (!S.me.admin) return new Map();
  if (S.users && !force) return S.users;
  try {
    const { users } = await api('GET', '/v1/users');
    S.users = new Map(users.map((u) => [u.id, u]));
  } catch (e) {
    if (e.status === 401) throw e;
    S.users = new Map();
  }
  return S.users;
}

/** Whether `action` of `upstream` is high risk (a high route, or a high-risk verb). */
function isHigh(action) {
  const verb = action.slice(action.indexOf(':') + 1);
  if (HIGH_SUFFIXES.includes(verb)) return true;
  for (const u of S.upstreams || []) {
    for (const r of u.routes || []) if (r.action === action && r.risk === 'high') return true;
    if (u.unlisted_tools === 'high' && action.startsWith(`${u.name}:`) && !u.actions.includes(action)) return true;
  }
  return false;
}

function agentLabel(id) {
  const agent = S.agents && S.agents.get(id);
  if (agent && agent.name && agent.name !== id) {
    return el('span', { class: 'agent' }, el('strong', {}, agent.name), ' ', el('span', { class: 'mono muted' }, id));
  }
  return el('span', { class: 'agent mono' }, id);
}

function subjectLabel(id) {
  if (id && S.me.id && id === S.me.id) return el('span', {}, 'you (', el('strong', {}, S.me.name), ')');
  const user = S.users && S.users.get(id);
  if (user) return el('span', {}, el('strong', {}, user.name), ' ', el('span', { class: 'mono muted' }, id));
  return id ? mono(id) : muted('unknown');
}

// ---------------------------------------------------------------------------------------------
// Session, navigation, routing

const main = () => document.getElementById('main');

function loginHref() {
  const hash = /^#\/[a-z/-]*$/.test(location.hash) ? location.hash : '';
  return `/login?return_to=${encodeURIComponent(`/console${hash}`)}`;
}

function showNotice(children, kind = 'warn') {
  const n = document.getElementById('notice');
  clear(n);
  n.className = `notice ${kind}`;
  add(n, [children]);
}

function hideNotice() {
  const n = document.getElementById('notice');
  n.className = 'notice hidden';
  clear(n);
}

function sessionEnded() {
  if (S.ended) return;
  S.ended = true;
  stopPage();
  stopPolling();
  clear(document.getElementById('nav'));
  clear(document.getElementById('who'));
  hideNotice();
  clear(main()).append(el('section', { class: 'panel center' },
    el('h1', {}, 'Your session ended'),
    el('p', {}, 'Log in again to go on.'),
    el('a', { class: 'button primary', href: loginHref() }, 'Log in again')));
}

function loggedOut(message) {
  clear(document.getElementById('nav'));
  clear(document.getElementById('who'));
  clear(main()).append(el('section', { class: 'panel center' },
    el('h1', {}, 'Leash console'),
    el('p', {}, message || 'Delegate one task at a time to an AI agent, approve what it asks, and see what it did.'),
    el('a', { class: 'button primary', href: loginHref() }, 'Log in')));
}

async function logout() {
  try {
    await api('POST', '/logout', undefined, { allow401: true, raw: true });
  } catch (e) {
    showNotice(errorLine(e), 'error');
    return;
  }
  S.ended = true;
  stopPage();
  stopPolling();
  hideNotice();
  loggedOut('You are logged out.');
}

const NAV = [
  ['inbox', 'Approvals'],
  ['tasks', 'Tasks'],
  ['vault', 'Vault'],
  ['audit', 'Audit'],
  ['review', 'Review'],
  ['admin', 'Admin'],
];

function renderNav(current) {
  const nav = clear(document.getElementById('nav'));
  for (const [route, label] of NAV) {
    if (route === 'admin' && !S.me.admin) continue;
    const link = el('a', { href: `#/${route}`, class: route === current ? 'active' : '' }, label);
    if (route === 'inbox') {
      link.append(el('span', { class: 'count hidden', id: 'inbox-count' }));
    }
    if (route === current) link.setAttribute('aria-current', 'page');
    nav.append(link);
  }
  updateCount();
  const who = clear(document.getElementById('who'));
  add(who, [el('span', { class: 'user' }, S.me.name),
    S.me.admin ? badge('admin', 'admin') : null,
    el('button', { type: 'button', class: 'link', events: { click: logout } }, 'Log out')]);
}

function updateCount() {
  const mine = visibleApprovals();
  const node = document.getElementById('inbox-count');
  document.title = mine.length ? `(${mine.length}) Leash console` : 'Leash console';
  if (!node) return;
  node.textContent = String(mine.length);
  node.className = mine.length ? 'count' : 'count hidden';
}

let page = null;

function stopPage() {
  if (!page) return;
  page.alive = false;
  for (const t of page.timers) clearInterval(t);
  for (const fn of page.cleanup) fn();
  page = null;
}

function newPage() {
  stopPage();
  page = {
    alive: true,
    timers: [],
    cleanup: [],
    every(ms, fn) { this.timers.push(setInterval(fn, ms)); },
    onApprovals(fn) { S.listeners.add(fn); this.cleanup.push(() => S.listeners.delete(fn)); },
  };
  return page;
}

const PAGES = {
  inbox: inboxPage,
  tasks: tasksPage,
  vault: vaultPage,
  audit: auditPage,
  review: reviewPage,
  admin: adminPage,
};

function route() {
  if (S.ended || !S.me) return;
  const parts = location.hash.replace(/^#\/?/, '').split('/').filter(Boolean);
  const name = PAGES[parts[0]] ? parts[0] : 'inbox';
  renderNav(name);
  hideNotice();
  const ctx = newPage();
  const root = clear(main());
  PAGES[name](root, ctx, parts.slice(1)).catch((e) => {
    if (ctx.alive && !S.ended) root.append(errorLine(e));
  });
}

// ---------------------------------------------------------------------------------------------
// Approvals polling (every second, whatever the page: the nav shows the count)

let pollTimer = null;

function stopPolling() {
  clearTimeout(pollTimer);
  pollTimer = null;
}

async function pollApprovals() {
  pollTimer = null;
  if (S.ended) return;
  try {
    const { approvals } = await api('GET', '/v1/approvals?status=pending');
    // Grants give each approval its human and whether its task is still live.
    if (approvals.some((a) => !S.grants.has(a.grant_id)) || Date.now() - S.grantsAt > 10000) await loadGrants();
    S.approvals = approvals;
    S.approvalsError = null;
    S.approvalsAt = Date.now();
  } catch (e) {
    S.approvalsError = e;
  }
  if (S.ended) return;
  updateCount();
  for (const fn of S.listeners) fn();
  pollTimer = setTimeout(pollApprovals, 1000);
}

/** The pending approvals the inbox shows: the human's own, or all for an admin who asks. */
function visibleApprovals() {
  return S.approvals.filter((a) => {
    if (!S.me.admin || S.showAll) return true;
    const g = S.grants.get(a.grant_id);
    return g ? g.subject === S.me.id : false;
  });
}

// ---------------------------------------------------------------------------------------------
// Body preview

/** JSON `text` re-indented token by token (numbers and strings exactly as sent), with the
 * member names that occur twice in one object; null if `text` is not JSON. */
function prettyJson(text) {
  try {
    JSON.parse(text);
  } catch (_) {
    return null;
  }
  const ws = ' \t\n\r';
  const stack = [];
  const dupes = [];
  let out = '';
  let i = 0;
  const pad = () => '  '.repeat(stack.length);
  while (i < text.length) {
    const c = text[i];
    if (ws.includes(c)) { i += 1; continue; }
    if (c === '"') {
      let j = i + 1;
      while (j < text.length && text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      const token = text.slice(i, j + 1);
      const top = stack[stack.length - 1];
      if (top && top.obj && top.expectKey) {
        const key = JSON.parse(token);
        if (top.keys.has(key)) dupes.push(key);
        top.keys.add(key);
        top.expectKey = false;
      }
      out += token;
      i = j + 1;
    } else if (c === '{' || c === '[') {
      const close = c === '{' ? '}' : ']';
      let k = i + 1;
      while (k < text.length && ws.includes(text[k])) k += 1;
      if (text[k] === close) {
        out += c + close;
        i = k + 1;
      } else {
        stack.push({ obj: c === '{', keys: new Set(), expectKey: c === '{' });
        out += `${c}\n${pad()}`;
        i += 1;
      }
    } else if (c === '}' || c === ']') {
      stack.pop();
      out += `\n${pad()}${c}`;
      i += 1;
    } else if (c === ',') {
      const top = stack[stack.length - 1];
      if (top && top.obj) top.expectKey = true;
      out += `,\n${pad()}`;
      i += 1;
    } else if (c === ':') {
      out += ': ';
      i += 1;
    } else {
      let j = i;
      while (j < text.length && !(ws + ',]}:').includes(text[j])) j += 1;
      out += text.slice(i, j);
      i = j;
    }
  }
  return { text: out, dupes };
}

function hexDump(data) {
  const lines = [];
  for (let off = 0; off < data.length; off += 16) {
    const row = data.subarray(off, off + 16);
    const hex = Array.from(row, (b) => b.toString(16).padStart(2, '0')).join(' ');
    const ascii = Array.from(row, (b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '.')).join('');
    lines.push(`${off.toString(16).padStart(8, '0')}  ${hex.padEnd(47)}  ${ascii}`);
  }
  return lines.join('\n');
}

/** A <pre> of `text` capped at BODY_SHOWN_CHARS, with a "show all" toggle. */
function cappedPre(text) {
  const wrap = el('div', { class: 'capped' });
  const pre = el('pre', { class: 'body' });
  let all = false;
  const draw = () => {
    clear(pre).append(vis(all ? text : text.slice(0, BODY_SHOWN_CHARS), '\n\t'));
    if (!all && text.length > BODY_SHOWN_CHARS) {
      pre.append(el('span', { class: 'cut' }, `\n… ${text.length - BODY_SHOWN_CHARS} more characters not shown`));
    }
  };
  draw();
  wrap.append(pre);
  if (text.length > BODY_SHOWN_CHARS) {
    const button = el('button', { type: 'button', class: 'small' }, 'Show all');
    button.addEventListener('click', () => {
      all = !all;
      button.textContent = all ? 'Show less' : 'Show all';
      draw();
    });
    wrap.append(button);
  }
  return wrap;
}

/** The body preview of approval `a`, filled in when it arrives. */
function bodyPreview(a) {
  const box = el('div', { class: 'body-box' });
  if (!a.body_previewed) {
    box.append(muted(a.body_size > 0
      ? 'Not previewed (too large or encoded): only its size and SHA-256 are bound.'
      : 'No body.'));
    return box;
  }
  box.append(muted('Loading the body…'));
  (async () => {
    let data;
    try {
      const res = await api('GET', `/v1/approvals/${idp(a.id)}/body`, undefined, { raw: true });
      data = new Uint8Array(await res.arrayBuffer());
    } catch (e) {
      clear(box).append(errorLine(e));
      return;
    }
    clear(box);
    if (data.length === 0) {
      box.append(muted('Empty body.'));
      return;
    }
    let text = null;
    try {
      text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(data);
    } catch (_) { /* not UTF-8 */ }
    if (text === null) {
      add(box, [el('p', { class: 'warn-text' }, `Binary, ${data.length} bytes (not UTF-8 text)`),
        el('pre', { class: 'body hex' }, vis(hexDump(data.subarray(0, HEX_BYTES)), '\n')),
        data.length > HEX_BYTES ? muted(`first ${HEX_BYTES} bytes shown`) : null]);
      return;
    }
    const pretty = prettyJson(text);
    if (pretty && pretty.dupes.length) {
      box.append(el('p', { class: 'warn-text' },
        'Warning: this JSON names a member twice (', pretty.dupes.join(', '),
        '); the app may read either value.'));
    }
    if (pretty && pretty.text !== text) {
      const raw = cappedPre(text);
      const formatted = cappedPre(pretty.text);
      raw.classList.add('hidden');
      const toggle = el('button', { type: 'button', class: 'small' }, 'Show exact bytes');
      toggle.addEventListener('click', () => {
        const showRaw = raw.classList.contains('hidden');
        raw.classList.toggle('hidden', !showRaw);
        formatted.classList.toggle('hidden', showRaw);
        toggle.textContent = showRaw ? 'Show formatted JSON' : 'Show exact bytes';
      });
      box.append(el('div', { class: 'body-head' }, muted('JSON, formatted'), toggle), formatted, raw);
    } else {
      box.append(cappedPre(text));
    }
  })();
  return box;
}

// ---------------------------------------------------------------------------------------------
// Elicitation form (MCP elicitation/create): primitive members only

function elicitationForm(schema) {
  const form = el('form', { class: 'elicit', noValidate: true });
  const props = (schema && typeof schema.properties === 'object' && schema.properties) || {};
  const required = new Set(Array.isArray(schema && schema.required) ? schema.required : []);
  const fields = [];
  for (const [name, p] of Object.entries(props)) {
    if (!p || typeof p !== 'object') continue;
    const label = typeof p.title === 'string' ? p.title : name;
    const fid = `f${Math.random().toString(36).slice(2)}`;
    let input;
    const enumValues = Array.isArray(p.enum) ? p.enum : null;
    if (enumValues) {
      input = el('select', { id: fid });
      if (!required.has(name)) input.append(el('option', { value: '' }, '(no answer)'));
      enumValues.forEach((v, i) => {
        const names = Array.isArray(p.enumNames) ? p.enumNames : [];
        input.append(el('option', { value: String(i) }, typeof names[i] === 'string' ? `${names[i]} (${v})` : String(v)));
      });
      if (p.default !== undefined && enumValues.includes(p.default)) input.value = String(enumValues.indexOf(p.default));
    } else if (p.type === 'boolean') {
      input = el('input', { id: fid, type: 'checkbox', checked: p.default === true });
    } else if (p.type === 'number' || p.type === 'integer') {
      input = el('input', { id: fid, type: 'number', step: p.type === 'integer' ? '1' : 'any' });
      if (typeof p.minimum === 'number') input.min = String(p.minimum);
      if (typeof p.maximum === 'number') input.max = String(p.maximum);
      if (typeof p.default === 'number') input.value = String(p.default);
    } else {
      const type = { email: 'email', uri: 'url', date: 'date', 'date-time': 'datetime-local' }[p.format] || 'text';
      input = el('input', { id: fid, type, autocomplete: 'off' });
      if (typeof p.maxLength === 'number') input.maxLength = p.maxLength;
      if (typeof p.default === 'string') input.value = p.default;
    }
    fields.push({ name, p, input, enumValues });
    form.append(el('div', { class: 'field' },
      el('label', { htmlFor: fid }, label, required.has(name) ? el('span', { class: 'req' }, ' *') : null,
        label !== name ? el('span', { class: 'muted mono' }, ` ${name}`) : null),
      input,
      typeof p.description === 'string' ? el('div', { class: 'help' }, p.description) : null));
  }
  if (!fields.length) form.append(muted('The server asks for no data: approving just says yes.'));
  /** The answer, or throws a message naming the field. */
  form.collect = () => {
    const content = {};
    for (const { name, p, input, enumValues } of fields) {
      const title = typeof p.title === 'string' ? p.title : name;
      if (enumValues) {
        if (input.value === '') {
          if (required.has(name)) throw new Error(`${escapeText(title)}: choose a value`);
          continue;
        }
        content[name] = enumValues[Number(input.value)];
      } else if (p.type === 'boolean') {
        content[name] = input.checked;
      } else if (p.type === 'number' || p.type === 'integer') {
        if (input.value.trim() === '') {
          if (required.has(name)) throw new Error(`${escapeText(title)}: a number is needed`);
          continue;
        }
        const n = Number(input.value);
        if (!Number.isFinite(n) || (p.type === 'integer' && !Number.isInteger(n))) {
          throw new Error(`${escapeText(title)}: not ${p.type === 'integer' ? 'an integer' : 'a number'}`);
        }
        content[name] = n;
      } else {
        let v = input.value;
        if (v === '') {
          if (required.has(name)) throw new Error(`${escapeText(title)}: required`);
          continue;
        }
        if (p.format === 'date-time') {
          const t = new Date(v);
          if (Number.isNaN(t.getTime())) throw new Error(`${escapeText(title)}: not a date and time`);
          v = t.toISOString();
        }
        content[name] = v;
      }
    }
    return content;
  };
  return form;
}

// ---------------------------------------------------------------------------------------------
// 1. Approvals inbox

function field(label, ...value) {
  return el('div', { class: 'kv' }, el('div', { class: 'k' }, label), el('div', { class: 'v' }, ...value));
}

function queryView(query) {
  if (!query) return null;
  const rows = [];
  for (const part of query.split('&')) {
    if (!part) continue;
    const eq = part.indexOf('=');
    const dec = (s) => {
      try { return decodeURIComponent(s.replace(/\+/g, ' ')); } catch (_) { return s; }
    };
    rows.push(el('tr', {}, el('td', { class: 'mono' }, dec(eq < 0 ? part : part.slice(0, eq))),
      el('td', { class: 'mono' }, eq < 0 ? muted('(no value)') : dec(part.slice(eq + 1)))));
  }
  return el('div', {},
    el('div', { class: 'mono wrap' }, '?', query),
    rows.length ? el('table', { class: 'mini' }, el('tbody', {}, rows)) : null);
}

function headersView(headers) {
  if (!headers || !headers.length) return muted('none');
  return el('table', { class: 'mini' }, el('tbody', {},
    headers.map((h) => el('tr', {}, el('td', { class: 'mono hname' }, h.name), el('td', { class: 'mono' }, h.value)))));
}

/** What a card shows of `a`: a change rebuilds the card. */
function approvalSig(a) {
  const grant = S.grants.get(a.grant_id);
  return `${JSON.stringify(a)}|${grant ? grant.status : ''}`;
}

function approvalCard(a) {
  const grant = S.grants.get(a.grant_id);
  const high = isHigh(a.action);
  const asked = grant && grant.approval_required.includes(a.action);
  const isElicitation = a.method === 'elicitation/create';
  const isTool = a.method === 'tools/call';
  const toolName = isTool && a.path.startsWith('/tools/') ? a.path.slice('/tools/'.length) : null;
  const expires = parseTime(a.expires_at);

  const clock = el('span', { class: 'countdown' });
  const card = el('article', { class: `card approval${high ? ' high' : ''}` });
  const status = el('div', { class: 'card-status' });
  const approveBtn = el('button', { type: 'button', class: 'primary approve' }, isElicitation ? 'Send answer' : 'Approve');
  const denyBtn = el('button', { type: 'button', class: 'danger deny' }, isElicitation ? 'Decline' : 'Deny');

  let what;
  if (isElicitation) {
    what = el('div', { class: 'what' },
      el('div', { class: 'sentence' }, 'The MCP server ', el('strong', { class: 'mono' }, a.upstream),
        ' asks you a question, through the agent\'s task:'),
      el('blockquote', { class: 'message' }, vis(a.elicitation ? a.elicitation.message : '(the question is no longer available)', '\n')));
  } else if (isTool) {
    what = el('div', { class: 'what' },
      el('div', { class: 'sentence' }, agentLabel(a.agent), ' wants to call the tool'),
      el('div', { class: 'request' }, badge('MCP', 'method'), el('span', { class: 'upstream' }, a.upstream),
        el('span', { class: 'path' }, toolName !== null ? toolName : a.path)),
      el('div', { class: 'muted small' }, 'The arguments are bound by their SHA-256: see the body below.'));
  } else {
    let decoded = null;
    try { decoded = decodeURIComponent(a.path); } catch (_) { /* shown as sent */ }
    what = el('div', { class: 'what' },
      el('div', { class: 'sentence' }, agentLabel(a.agent), ' wants to send'),
      el('div', { class: 'request' }, badge(a.method, `method m-${/^[A-Z]+$/.test(a.method) ? a.method.toLowerCase() : 'other'}`),
        el('span', { class: 'upstream' }, a.upstream), el('span', { class: 'path' }, a.path)),
      decoded !== null && decoded !== a.path
        ? el('div', { class: 'decoded small' }, muted('decoded: '), el('span', { class: 'mono' }, decoded)) : null);
  }

  const reason = [];
  if (high) reason.push(badge('HIGH RISK', 'risk-high'));
  if (asked) reason.push(badge('you asked to approve this action', 'info'));

  const ended = !!grant && grant.status !== 'active';
  add(card, [
    el('header', { class: 'card-head' },
      el('div', {}, el('span', { class: 'action' }, a.action), ...reason),
      el('div', { class: 'expiry' }, 'expires ', clock)),
    ended ? el('p', { class: 'warn-text' }, `This task has ended (${grant.status}): the agent can no longer use an approval. Deny it to clear it.`) : null,
    what,
    el('div', { class: 'kvs' },
      field('For the task', el('span', { class: 'purpose' }, a.purpose === null ? muted('(grant not found)') : a.purpose),
        ' ', el('span', { class: 'mono muted small' }, a.grant_id)),
      field('On behalf of', subjectLabel(grant ? grant.subject : (S.me.admin ? null : S.me.id))),
      isElicitation ? field('Agent', agentLabel(a.agent)) : null,
      !isElicitation && !isTool ? field('Query', a.query ? queryView(a.query) : muted('none')) : null,
      isTool ? field('Arguments SHA-256', el('span', { class: 'mono wrap' }, (a.query || '').replace(/^arguments_sha256=/, ''))) : null,
      !isElicitation ? field('Headers', headersView(a.headers)) : null,
      !isElicitation ? field('Body', a.body_size > 0 ? [`${bytes(a.body_size)} · `,
        el('span', { class: 'mono muted small wrap' }, `SHA-256 ${a.body_sha256}`)] : muted('none')) : null,
      field('Requested', timeEl(a.requested_at)))]);

  let form = null;
  if (isElicitation) {
    form = a.elicitation ? elicitationForm(a.elicitation.requested_schema) : null;
    if (form) {
      card.append(el('h3', {}, 'Your answer'), form);
      form.addEventListener('submit', (ev) => { ev.preventDefault(); decide(true); });
    } else {
      approveBtn.disabled = true;
    }
  } else if (a.body_size > 0) {
    card.append(el('h3', {}, isTool ? 'The call (JSON-RPC message)' : 'Body'), bodyPreview(a));
  }
  if (ended) {
    approveBtn.disabled = true;
    approveBtn.dataset.done = '1';
    card.classList.add('ended');
  }
  card.append(el('footer', { class: 'card-actions' }, approveBtn, denyBtn, status));

  const tick = (now) => {
    const left = expires === null ? 1 : expires - now;
    clock.textContent = expires === null ? a.expires_at : countdown(left);
    clock.classList.toggle('soon', left < 60000);
    if (left <= 0 && !approveBtn.dataset.done) {
      approveBtn.disabled = true;
      denyBtn.disabled = true;
    }
  };
  tick(Date.now());

  const self = { node: card, sig: approvalSig(a), tick, decided: false };

  async function decide(approve) {
    let body;
    if (approve && isElicitation) {
      try {
        body = { content: form.collect() };
      } catch (e) {
        clear(status).append(errorLine(e));
        return;
      }
    }
    approveBtn.disabled = true;
    denyBtn.disabled = true;
    clear(status).append(muted(approve ? 'Approving…' : 'Denying…'));
    try {
      const result = await api('POST', `/v1/approvals/${idp(a.id)}/${approve ? 'approve' : 'deny'}`, body);
      self.decided = true;
      approveBtn.dataset.done = '1';
      showOutcome(result && result.status ? result.status : (approve ? 'approved' : 'denied'), true);
    } catch (e) {
      approveBtn.disabled = !!(isElicitation && !form) || ended;
      denyBtn.disabled = false;
      clear(status).append(errorLine(e));
    }
  }

  function showOutcome(st, byMe) {
    approveBtn.disabled = true;
    denyBtn.disabled = true;
    approveBtn.dataset.done = '1';
    card.classList.add('decided', `st-${/^[a-z]+$/.test(st) ? st : 'other'}`);
    const text = {
      approved: isElicitation ? 'Answered: the server gets your answer.' : 'Approved: the agent\'s request goes through once.',
      denied: isElicitation ? 'Declined.' : 'Denied: the agent\'s request is refused.',
      used: 'Approved and used.',
      expired: 'Expired: nobody decided in time.',
    }[st] || `Now ${st}.`;
    add(clear(status), [el('strong', {}, text), byMe ? null : muted(' (decided elsewhere, expired or withdrawn)')]);
  }
  self.showOutcome = showOutcome;

  approveBtn.addEventListener('click', () => decide(true));
  denyBtn.addEventListener('click', () => decide(false));
  return self;
}

async function inboxPage(root, ctx) {
  await Promise.all([loadUpstreams(), loadGrants(true), loadAgents(), loadUsers()]);
  if (!ctx.alive) return;
  const list = el('div', { class: 'cards' });
  const empty = el('div', { class: 'empty hidden' }, 'Nothing is waiting for your approval.');
  const state = el('span', { class: 'muted small poll-state' });
  const head = el('div', { class: 'page-head' },
    el('h1', {}, 'Approvals'),
    el('p', { class: 'lede' }, 'What your agents ask to do that needs your yes. Read each request: approving lets exactly this request through once.'));
  if (S.me.admin) {
    const mine = el('input', { type: 'radio', name: 'scope', id: 'scope-mine', checked: !S.showAll, disabled: !S.me.id });
    const all = el('input', { type: 'radio', name: 'scope', id: 'scope-all', checked: S.showAll });
    const onChange = () => { S.showAll = all.checked; updateCount(); render(); };
    mine.addEventListener('change', onChange);
    all.addEventListener('change', onChange);
    head.append(el('div', { class: 'toggle' }, mine, el('label', { htmlFor: 'scope-mine' }, 'Mine'),
      all, el('label', { htmlFor: 'scope-all' }, 'All humans\'')));
  }
  head.append(state);
  root.append(head, empty, list);

  const cards = new Map();

  function render() {
    if (S.approvalsError) {
      clear(state).append(el('span', { class: 'error-text' }, `Not updated: ${S.approvalsError.message}`));
    } else if (S.approvalsAt) {
      state.textContent = `Checked ${new Date(S.approvalsAt).toLocaleTimeString()} · every second`;
    }
    const shown = visibleApprovals().slice().sort((x, y) => (x.expires_at < y.expires_at ? -1 : 1));
    const ids = new Set(shown.map((a) => a.id));
    shown.forEach((a, i) => {
      let c = cards.get(a.id);
      const sig = approvalSig(a);
      if (c && !c.decided && c.sig !== sig) {
        // Something it shows changed (rare for a pending approval): rebuild that card only.
        const fresh = approvalCard(a);
        c.node.replaceWith(fresh.node);
        cards.set(a.id, fresh);
        c = fresh;
      }
      if (!c) {
        c = approvalCard(a);
        cards.set(a.id, c);
        c.node.classList.add('new');
        setTimeout(() => c.node.classList.remove('new'), 1500);
      }
      const at = list.children[i];
      if (at !== c.node) list.insertBefore(c.node, at || null);
    });
    for (const [id, c] of cards) {
      if (ids.has(id) || c.leaving) continue;
      c.leaving = true;
      if (!c.decided) {
        // Gone from the pending list: say what became of it.
        api('GET', `/v1/approvals/${idp(id)}`).then((r) => c.showOutcome(r.status, false))
          .catch(() => c.showOutcome('gone', false));
      }
      setTimeout(() => { c.node.remove(); cards.delete(id); }, c.decided ? 4000 : 6000);
    }
    const now = Date.now();
    for (const c of cards.values()) if (!c.decided) c.tick(now);
    empty.classList.toggle('hidden', shown.length > 0 || cards.size > 0);
  }

  ctx.onApprovals(render);
  render();
}

// ---------------------------------------------------------------------------------------------
// Inline "are you sure?"

function confirmButton(label, question, yesLabel, onYes, kind = 'danger') {
  const wrap = el('span', { class: 'confirm' });
  const button = el('button', { type: 'button', class: `small ${kind}` }, label);
  const reset = () => clear(wrap).append(button);
  button.addEventListener('click', () => {
    const yes = el('button', { type: 'button', class: `small ${kind}` }, yesLabel);
    const no = el('button', { type: 'button', class: 'small' }, 'Cancel');
    no.addEventListener('click', reset);
    yes.addEventListener('click', async () => {
      yes.disabled = true;
      no.disabled = true;
      try {
        await onYes();
      } catch (e) {
        clear(wrap).append(errorLine(e), button);
      }
    });
    clear(wrap).append(el('span', { class: 'question' }, question), yes, no);
    no.focus();
  });
  wrap.append(button);
  return wrap;
}

// ---------------------------------------------------------------------------------------------
// 2. Tasks

function statusBadge(st) {
  return badge(st, `st st-${/^[a-z_]+$/.test(st) ? st : 'other'}`);
}

function grantsTable(grants, { withSubject = false, onChange }) {
  if (!grants.length) return el('div', { class: 'empty' }, 'No grants.');
  const rows = grants.map((g) => {
    const actions = [];
    if (g.status === 'active') {
      actions.push(confirmButton('Revoke', 'Revoke this grant? Every token of it dies at once.', 'Yes, revoke',
        async () => { await api('POST', `/v1/grants/${idp(g.id)}/revoke`, {}); await onChange(); }));
      if (g.subject === S.me.id) {
        actions.push(confirmButton('Complete', 'Mark the task done? The agent loses access.', 'Yes, complete',
          async () => { await api('POST', `/v1/grants/${idp(g.id)}/complete`); await onChange(); }, 'secondary'));
      }
    }
    return el('tr', { class: g.status === 'active' ? '' : 'ended' },
      el('td', { class: 'c-purpose' }, el('div', { class: 'purpose' }, g.purpose), el('div', { class: 'mono muted small' }, g.id)),
      withSubject ? el('td', { class: 'c-user' }, subjectLabel(g.subject)) : null,
      el('td', { class: 'c-agent' }, agentLabel(g.agent)),
      el('td', { class: 'c-actions' }, el('div', { class: 'actions-list' }, g.actions.map((a) => el('span', { class: `chip${isHigh(a) ? ' high' : ''}` }, a,
        g.approval_required.includes(a) ? el('span', { class: 'flag', title: 'asks you before each request' }, ' ask') : null,
        g.single_use.includes(a) ? el('span', { class: 'flag', title: 'once per token' }, ' 1×') : null)))),
      el('td', {}, statusBadge(g.status)),
      el('td', { class: 'c-time' }, timeEl(g.expires_at)),
      el('td', { class: 'num' }, String(g.requests_used), g.max_requests !== null && g.max_requests !== undefined ? ` / ${g.max_requests}` : ''),
      el('td', { class: 'row-actions' }, actions));
  });
  return el('table', { class: 'table' },
    el('thead', {}, el('tr', {}, el('th', {}, 'Task (purpose)'), withSubject ? el('th', {}, 'Human') : null,
      el('th', {}, 'Agent'), el('th', {}, 'Actions'), el('th', {}, 'Status'), el('th', {}, 'Expires'),
      el('th', {}, 'Requests'), el('th', {}, ''))),
    el('tbody', {}, rows));
}

function sortGrants(grants) {
  return grants.slice().sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
}

async function tasksPage(root, ctx) {
  await Promise.all([loadUpstreams(), loadAgents(), loadGrants(true)]);
  if (!ctx.alive) return;
  root.append(el('div', { class: 'page-head' }, el('h1', {}, 'Tasks'),
    el('p', { class: 'lede' }, 'Delegate one task to one agent: which apps, which actions, for how long.')));

  // The form.
  const datalist = el('datalist', { id: 'agents-list' },
    [...S.agents.values()].filter((a) => a.status === 'active').map((a) => el('option', { value: a.id }, a.name)));
  const agent = el('input', { id: 'g-agent', type: 'text', required: true, autocomplete: 'off', spellcheck: false, placeholder: 'spiffe://example.org/agent/…' });
  agent.setAttribute('list', 'agents-list');
  const purpose = el('input', { id: 'g-purpose', type: 'text', required: true, maxLength: 1000, placeholder: 'Summarise my inbox and draft replies' });
  const ttl = el('select', { id: 'g-ttl' },
    el('option', { value: '900' }, '15 minutes'), el('option', { value: '3600', defaultSelected: true }, '1 hour'),
    el('option', { value: '28800' }, '8 hours'), el('option', { value: 'custom' }, 'Other (seconds)…'));
  const ttlCustom = el('input', { id: 'g-ttl-s', type: 'number', min: '1', step: '1', class: 'hidden narrow', placeholder: 'seconds' });
  ttl.addEventListener('change', () => ttlCustom.classList.toggle('hidden', ttl.value !== 'custom'));
  const maxRequests = el('input', { id: 'g-max', type: 'number', min: '1', step: '1', class: 'narrow', placeholder: 'no limit' });

  const actionRows = [];
  const apps = el('div', { class: 'apps' });
  for (const u of S.upstreams) {
    const rows = u.actions.map((action) => {
      const high = isHigh(action);
      const use = el('input', { type: 'checkbox', id: `a-${u.name}-${action}` });
      const approve = el('input', { type: 'checkbox', disabled: true, title: 'ask me before each request of this action' });
      const single = el('input', { type: 'checkbox', disabled: true, title: 'one request per token' });
      use.addEventListener('change', () => {
        approve.disabled = !use.checked;
        single.disabled = !use.checked;
        if (!use.checked) { approve.checked = false; single.checked = false; }
      });
      actionRows.push({ upstream: u.name, action, use, approve, single });
      return el('tr', {},
        el('td', {}, use, ' ', el('label', { htmlFor: use.id, class: 'mono' }, action)),
        el('td', {}, high ? badge('high risk', 'risk-high') : muted('normal'),
          high ? el('div', { class: 'help' }, 'always asks you first') : null),
        el('td', { class: 'center' }, approve),
        el('td', { class: 'center' }, single));
    });
    apps.append(el('fieldset', { class: 'app' },
      el('legend', {}, el('span', { class: 'mono' }, u.name), u.unlisted_tools ? muted(` (MCP; unlisted tools: ${u.unlisted_tools})`) : null),
      rows.length ? el('table', { class: 'mini actions-table' },
        el('thead', {}, el('tr', {}, el('th', {}, 'Action'), el('th', {}, 'Risk'), el('th', {}, 'Ask me first'), el('th', {}, 'Single use'))),
        el('tbody', {}, rows)) : muted('no actions')));
  }
  if (!S.upstreams.length) apps.append(muted('No apps are configured behind this Leash.'));

  const formStatus = el('div', { class: 'form-status' });
  const handleBox = el('div', { class: 'handle-slot' });
  const submit = el('button', { type: 'submit', class: 'primary' }, 'Delegate the task');
  const form = el('form', { class: 'panel form', autocomplete: 'off' },
    el('h2', {}, 'Delegate a task'),
    el('div', { class: 'field' }, el('label', { htmlFor: 'g-agent' }, 'Agent'), agent, datalist,
      el('div', { class: 'help' }, 'The agent\'s id (its registered URI).')),
    el('div', { class: 'field' }, el('label', { htmlFor: 'g-purpose' }, 'Purpose'), purpose,
      el('div', { class: 'help' }, 'What the task is; shown in every approval and in the audit trail.')),
    el('div', { class: 'field' }, el('div', { class: 'label' }, 'Apps and actions'), apps),
    el('div', { class: 'row' },
      el('div', { class: 'field' }, el('label', { htmlFor: 'g-ttl' }, 'Time limit'), el('div', {}, ttl, ' ', ttlCustom)),
      el('div', { class: 'field' }, el('label', { htmlFor: 'g-max' }, 'Max requests'), maxRequests)),
    el('div', { class: 'form-actions' }, submit, formStatus));

  const tableSlot = el('div', {});
  const showEnded = el('input', { type: 'checkbox', id: 'show-ended' });
  const drawTable = () => {
    const mine = sortGrants([...S.grants.values()].filter((g) => !S.me.id || g.subject === S.me.id || !S.me.admin));
    const shown = showEnded.checked ? mine : mine.filter((g) => g.status === 'active');
    clear(tableSlot).append(grantsTable(shown, { onChange: refresh }));
  };
  const refresh = async () => {
    await loadGrants(true);
    if (ctx.alive) drawTable();
  };
  showEnded.addEventListener('change', drawTable);

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clear(formStatus);
    const chosen = actionRows.filter((r) => r.use.checked);
    const seconds = ttl.value === 'custom' ? Number(ttlCustom.value) : Number(ttl.value);
    const problems = [];
    if (!agent.value.trim()) problems.push('name the agent');
    if (!purpose.value.trim()) problems.push('say what the task is');
    if (!chosen.length) problems.push('choose at least one action');
    if (!Number.isInteger(seconds) || seconds <= 0) problems.push('the time limit must be a whole number of seconds');
    const max = maxRequests.value.trim() === '' ? null : Number(maxRequests.value);
    if (max !== null && (!Number.isInteger(max) || max <= 0)) problems.push('max requests must be a positive whole number');
    if (problems.length) {
      formStatus.append(el('div', { class: 'error-line' }, `Please ${problems.join(', ')}.`));
      return;
    }
    const body = {
      agent: agent.value.trim(),
      purpose: purpose.value,
      upstreams: [...new Set(chosen.map((r) => r.upstream))],
      actions: chosen.map((r) => r.action),
      approval_required: chosen.filter((r) => r.approve.checked).map((r) => r.action),
      single_use: chosen.filter((r) => r.single.checked).map((r) => r.action),
      ttl_seconds: seconds,
    };
    if (max !== null) body.max_requests = max;
    submit.disabled = true;
    try {
      const created = await api('POST', '/v1/grants', body);
      showHandle(handleBox, created);
      form.reset();
      ttlCustom.classList.add('hidden');
      for (const r of actionRows) { r.approve.disabled = true; r.single.disabled = true; }
      await refresh();
    } catch (e) {
      formStatus.append(errorLine(e));
    } finally {
      submit.disabled = false;
    }
  });

  root.append(handleBox, form,
    el('section', { class: 'panel' },
      el('div', { class: 'section-head' }, el('h2', {}, 'Your tasks'),
        el('label', { class: 'inline' }, showEnded, ' show ended ones')),
      tableSlot));
  drawTable();
  ctx.every(10000, () => { if (ctx.alive) refresh().catch(() => {}); });
}

function showHandle(slot, created) {
  const code = el('code', { class: 'handle' }, created.handle);
  const copy = el('button', { type: 'button', class: 'primary small' }, 'Copy');
  const copied = el('span', { class: 'muted small' });
  copy.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(created.handle);
      copied.textContent = 'Copied.';
    } catch (_) {
      const range = document.createRange();
      range.selectNodeContents(code);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      copied.textContent = 'Selected: press Ctrl+C to copy.';
    }
  });
  const done = el('button', { type: 'button', class: 'small' }, 'I have saved it');
  done.addEventListener('click', () => clear(slot));
  clear(slot).append(el('section', { class: 'panel handle-box', role: 'status' },
    el('h2', {}, 'Task delegated: give this handle to the agent'),
    el('p', { class: 'warn-text' }, 'It is shown only this once: Leash keeps only its hash and cannot show it again. It is useless without the agent\'s own key.'),
    el('div', { class: 'handle-row' }, code, copy, copied),
    el('p', { class: 'muted small' }, 'Grant ', el('span', { class: 'mono' }, created.id), ' · ', created.purpose,
      ' · expires ', timeEl(created.expires_at)),
    done));
}

// ---------------------------------------------------------------------------------------------
// 3. Vault

async function vaultPage(root, ctx) {
  await loadUpstreams();
  if (!ctx.alive) return;
  root.append(el('div', { class: 'page-head' }, el('h1', {}, 'Vault'),
    el('p', { class: 'lede' }, 'Your credentials for the apps behind Leash. Leash injects them into your agents\' allowed requests; agents never see them, and neither does this page once saved.')));
  const listSlot = el('div', {});
  const draw = async () => {
    const { credentials } = await api('GET', '/v1/vault');
    if (!ctx.alive) return;
    clear(listSlot);
    if (!credentials.length) {
      listSlot.append(el('div', { class: 'empty' }, 'No credentials stored.'));
      return;
    }
    listSlot.append(el('table', { class: 'table' },
      el('thead', {}, el('tr', {}, ['App', 'Kind', 'Header', 'Expires', 'Stored', ''].map((h) => el('th', {}, h)))),
      el('tbody', {}, credentials.map((c) => el('tr', { 'data-upstream': c.upstream },
        el('td', { class: 'mono' }, c.upstream),
        el('td', {}, c.kind === 'oauth' ? 'OAuth connection' : c.kind,
          c.status === 'reconnect' ? [' ', badge('reconnect needed', 'danger')] : []),
        el('td', { class: 'mono' }, c.name),
        el('td', { class: 'c-time' }, c.expires_at ? timeEl(c.expires_at) : muted(c.kind === 'oauth' ? 'kept fresh' : 'never')), el('td', { class: 'c-time' }, timeEl(c.created_at)),
        el('td', { class: 'row-actions' },
          c.status === 'reconnect' ? connectButton(c.upstream, 'Reconnect') : [],
          confirmButton('Delete', `Delete the ${escapeText(c.upstream)} credential?`, 'Yes, delete',
            async () => { await api('DELETE', `/v1/vault/${encodeURIComponent(c.upstream)}`); await draw(); })))))));
  };
  const connectable = S.upstreams.filter((u) => u.credential === 'oauth');
  const connectPanel = connectable.length ? el('section', { class: 'panel' }, el('h2', {}, 'Connect an account'),
    el('p', { class: 'muted' }, 'These apps sign you in with their own OAuth server. Leash keeps the tokens sealed and fresh; your agents never see them.'),
    el('div', { class: 'row' }, connectable.map((u) => connectButton(u.name, `Connect ${u.name}`)))) : [];

  const upstream = el('select', { id: 'v-up' }, S.upstreams.filter((u) => !u.credential || u.credential === 'vault')
    .map((u) => el('option', { value: u.name }, u.name)));
  const kind = el('select', { id: 'v-kind' }, el('option', { value: 'bearer' }, 'Bearer token (Authorization: Bearer …)'),
    el('option', { value: 'cookie' }, 'Cookie (name=value)'), el('option', { value: 'header' }, 'Header (name and value)'));
  const name = el('input', { id: 'v-name', type: 'text', placeholder: 'X-Api-Key', autocomplete: 'off', spellcheck: false });
  const nameField = el('div', { class: 'field hidden' }, el('label', { htmlFor: 'v-name' }, 'Header name'), name);
  kind.addEventListener('change', () => nameField.classList.toggle('hidden', kind.value !== 'header'));
  const secret = el('input', { id: 'v-secret', type: 'password', autocomplete: 'new-password', spellcheck: false });
  const expires = el('input', { id: 'v-exp', type: 'datetime-local' });
  const status = el('div', { class: 'form-status' });
  const save = el('button', { type: 'submit', class: 'primary' }, 'Save');
  const form = el('form', { class: 'panel form', autocomplete: 'off' },
    el('h2', {}, 'Store or replace a credential'),
    el('div', { class: 'row' },
      el('div', { class: 'field' }, el('label', { htmlFor: 'v-up' }, 'App'), upstream),
      el('div', { class: 'field' }, el('label', { htmlFor: 'v-kind' }, 'Kind'), kind)),
    nameField,
    el('div', { class: 'field' }, el('label', { htmlFor: 'v-secret' }, 'Secret'), secret,
      el('div', { class: 'help' }, 'Sent once to Leash, sealed there, never shown again. Saving replaces the app\'s current credential.')),
    el('div', { class: 'field' }, el('label', { htmlFor: 'v-exp' }, 'Expires (optional)'), expires),
    el('div', { class: 'form-actions' }, save, status));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clear(status);
    if (!secret.value) { status.append(el('div', { class: 'error-line' }, 'Enter the secret.')); return; }
    const body = { kind: kind.value, secret: secret.value };
    if (kind.value === 'header') body.name = name.value.trim();
    if (expires.value) {
      const t = new Date(expires.value);
      if (Number.isNaN(t.getTime())) { status.append(el('div', { class: 'error-line' }, 'The expiry is not a date.')); return; }
      body.expires_at = t.toISOString().replace(/\.\d{3}Z$/, 'Z');
    }
    save.disabled = true;
    try {
      await api('PUT', `/v1/vault/${encodeURIComponent(upstream.value)}`, body);
      secret.value = '';
      status.append(el('span', { class: 'ok-text' }, 'Saved.'));
      await draw();
    } catch (e) {
      status.append(errorLine(e));
    } finally {
      body.secret = '';
      save.disabled = false;
    }
  });
  add(root, [el('section', { class: 'panel' }, el('h2', {}, 'Stored credentials'), listSlot), connectPanel, form]);
  await draw();
}

// Starts an OAuth connection and goes to the app's consent page; its answer comes back to
// this browser's session, then to this page.
function connectButton(upstream, label) {
  const b = el('button', { type: 'button', class: 'primary', 'data-connect': upstream }, label);
  b.addEventListener('click', async () => {
    b.disabled = true;
    try {
      const started = await api('POST', `/v1/vault/${encodeURIComponent(upstream)}/connect`);
      const target = new URL(started.authorization_url);
      if (target.protocol !== 'https:' && target.protocol !== 'http:') throw new Error('not a web address');
      window.location.assign(target.href);
    } catch (e) {
      b.disabled = false;
      b.after(errorLine(e));
    }
  });
  return b;
}

// ---------------------------------------------------------------------------------------------
// 4. Audit

/** RFC 8785 (JCS) form of a JSON value parsed by JSON.parse (strings, integers, null, booleans,
 * arrays, objects: JSON.stringify's forms are JCS's; keys sorted by UTF-16 code units). */
function jcs(v) {
  if (v === null || typeof v !== 'object') return JSON.stringify(v);
  if (Array.isArray(v)) return `[${v.map(jcs).join(',')}]`;
  return `{${Object.keys(v).sort().map((k) => `${JSON.stringify(k)}:${jcs(v[k])}`).join(',')}}`;
}

async function sha256hex(text) {
  const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Each event's own hash checked, and prev_hash against the previous event where seqs follow. */
async function verifyChain(events, before) {
  const bad = [];
  let prev = before;
  for (const ev of events) {
    const { hash, ...rest } = ev;
    const computed = await sha256hex(jcs(rest));
    ev._hashOk = computed === hash;
    ev._linkOk = !(prev && prev.seq + 1 === ev.seq) || ev.prev_hash === prev.hash;
    if (!ev._hashOk) bad.push({ seq: ev.seq, why: 'its hash does not match its content' });
    else if (!ev._linkOk) bad.push({ seq: ev.seq, why: 'its prev_hash does not match the previous event' });
    prev = ev;
  }
  return bad;
}

function auditEvent(ev) {
  const mode = typeof ev.mode === 'string' ? ev.mode : 'unknown';
  const decision = typeof ev.decision === 'string' ? ev.decision : null;
  const ok = ev._hashOk && ev._linkOk;
  const rows = [];
  const kv = (k, v) => { if (v !== null && v !== undefined && v !== '' && !(Array.isArray(v) && !v.length)) rows.push(field(k, v)); };
  kv('Purpose', ev.purpose);
  kv('Actor', ev.actor ? (String(ev.actor).startsWith('usr_') ? subjectLabel(String(ev.actor)) : agentLabel(String(ev.actor))) : null);
  kv('Subject', ev.subject ? subjectLabel(String(ev.subject)) : null);
  kv('Grant', ev.grant_id ? el('span', { class: 'mono' }, String(ev.grant_id)) : null);
  kv('Request', ev.method || ev.path ? el('span', { class: 'mono wrap' }, `${ev.method || ''} ${ev.upstream ? `${ev.upstream} ` : ''}${ev.path || ''}`) : null);
  kv('Reason', ev.reason);
  kv('Policies', Array.isArray(ev.policies) && ev.policies.length ? ev.policies.join(', ') : null);
  kv('Approver', ev.approver);
  kv('Request id', ev.request_id ? el('span', { class: 'mono' }, String(ev.request_id)) : null);
  const known = new Set(['seq', 'ts', 'kind', 'mode', 'subject', 'actor', 'grant_id', 'purpose', 'action', 'upstream',
    'method', 'path', 'decision', 'reason', 'policies', 'approver', 'request_id', 'prev_hash', 'hash', '_hashOk', '_linkOk']);
  for (const [k, v] of Object.entries(ev)) {
    if (!known.has(k) && v !== null) kv(k, typeof v === 'string' ? v : JSON.stringify(v));
  }
  return el('li', { class: `event mode-${/^[a-z]+$/.test(mode) ? mode : 'other'}${ok ? '' : ' bad'}` },
    el('div', { class: 'event-head' },
      el('span', { class: 'seq mono' }, `#${ev.seq}`),
      badge(mode, `mode ${/^[a-z]+$/.test(mode) ? mode : ''}`),
      el('span', { class: 'kind mono' }, ev.kind),
      ev.action ? String(ev.action).split(' ').filter(Boolean).map((x) => el('span', { class: `chip${isHigh(x) ? ' high' : ''}` }, x)) : null,
      decision ? badge(decision, `dec dec-${/^[a-z_]+$/.test(decision) ? decision : 'other'}`) : null,
      el('span', { class: 'spacer' }),
      timeEl(ev.ts),
      el('span', { class: ok ? 'ok-text small' : 'error-text small', title: ok ? `hash ${ev.hash}` : 'does not verify' }, ok ? '✓ verified' : '✗ mismatch')),
    rows.length ? el('div', { class: 'kvs compact' }, rows) : null);
}

async function auditPage(root, ctx) {
  await Promise.all([loadGrants(true), loadUpstreams(), loadAgents(), loadUsers()]);
  if (!ctx.alive) return;
  root.append(el('div', { class: 'page-head' }, el('h1', {}, 'Audit'),
    el('p', { class: 'lede' }, 'Every decision about your grants, in Leash\'s hash chain. Each event shown is checked here in your browser.')));
  const grantSel = el('select', { id: 'au-grant' }, el('option', { value: '' }, S.me.admin ? 'All events' : 'All my grants'),
    sortGrants([...S.grants.values()]).map((g) => el('option', { value: g.id }, `${escapeText(g.purpose).slice(0, 80)} — ${g.id}`)));
  const order = el('select', { id: 'au-order' }, el('option', { value: 'new' }, 'Newest first'), el('option', { value: 'old' }, 'Oldest first'));
  const limit = el('select', { id: 'au-limit' }, ['20', '50', '100', '500', '1000'].map((n) => el('option', { value: n, selected: n === '100' }, n)));
  const since = el('input', { id: 'au-since', type: 'number', min: '0', step: '1', value: '0', class: 'narrow' });
  const load = el('button', { type: 'submit', class: 'primary' }, 'Show');
  const next = el('button', { type: 'button' }, 'Next page →');
  const prevBtn = el('button', { type: 'button' }, '← Previous page');
  const banner = el('div', { class: 'banner hidden' });
  const pageInfo = el('span', { class: 'muted small' });
  const list = el('ol', { class: 'timeline' });
  const controls = el('form', { class: 'panel controls' },
    el('div', { class: 'field' }, el('label', { htmlFor: 'au-grant' }, 'Grant'), grantSel),
    el('div', { class: 'field' }, el('label', { htmlFor: 'au-order' }, 'Order'), order),
    el('div', { class: 'field' }, el('label', { htmlFor: 'au-limit' }, 'Per page'), limit),
    el('div', { class: 'field' }, el('label', { htmlFor: 'au-since' }, 'After seq'), since),
    el('div', { class: 'field end' }, load));
  root.append(controls, banner, el('div', { class: 'pager' }, prevBtn, pageInfo, next), list);

  let events = [];
  const history = [];     // since_seq of the pages before
  let before = null;      // the event just before this page, when known (for prev_hash)

  const draw = () => {
    clear(list);
    const shown = order.value === 'new' ? events.slice().reverse() : events;
    for (const ev of shown) list.append(auditEvent(ev));
    if (!events.length) list.append(el('li', { class: 'empty' }, 'No events.'));
  };

  async function fetchPage(sinceSeq) {
    const q = new URLSearchParams();
    if (grantSel.value) q.set('grant_id', idp(grantSel.value));
    q.set('since_seq', String(sinceSeq));
    q.set('limit', limit.value);
    const res = await api('GET', `/v1/audit?${q}`, undefined, { raw: true });
    const text = await res.text();
    const out = [];
    for (const line of text.split('\n')) if (line.trim()) out.push(JSON.parse(line));
    return out;
  }

  async function show(sinceSeq, keepBefore) {
    load.disabled = true;
    try {
      const fetched = await fetchPage(sinceSeq);
      if (!ctx.alive) return;
      if (!keepBefore) before = null;
      events = fetched;
      since.value = String(sinceSeq);
      banner.className = 'banner';
      if (!window.crypto || !crypto.subtle) {
        clear(banner).append('This page is not a secure context (HTTPS), so the browser cannot compute SHA-256: the chain is not verified.');
        banner.classList.add('warn');
      } else {
        const bad = await verifyChain(events, before);
        clear(banner);
        if (!events.length) banner.classList.add('hidden');
        else if (!bad.length) {
          banner.classList.add('good');
          banner.append(el('strong', {}, `${events.length} events verified`),
            ` (seq ${events[0].seq}–${events[events.length - 1].seq}): each hash matches its event, and each prev_hash the event before it where the previous seq is shown.`);
        } else {
          banner.classList.add('bad');
          banner.append(el('strong', {}, `Event seq ${bad[0].seq} does not match`), `: ${bad[0].why}.`,
            bad.length > 1 ? ` ${bad.length - 1} more events do not verify either.` : '',
            ' The audit trail may have been tampered with: run `leash audit verify` on the server.');
        }
      }
      pageInfo.textContent = events.length
        ? `seq ${events[0].seq} to ${events[events.length - 1].seq}` : `no events after seq ${sinceSeq}`;
      next.disabled = events.length < Number(limit.value);
      prevBtn.disabled = history.length === 0;
      draw();
    } catch (e) {
      clear(banner).append(errorLine(e));
      banner.className = 'banner bad';
    } finally {
      load.disabled = false;
    }
  }

  controls.addEventListener('submit', (ev) => {
    ev.preventDefault();
    history.length = 0;
    const n = Number(since.value);
    show(Number.isInteger(n) && n >= 0 ? n : 0, false);
  });
  grantSel.addEventListener('change', () => { history.length = 0; show(0, false); });
  order.addEventListener('change', draw);
  next.addEventListener('click', () => {
    if (!events.length) return;
    history.push(Number(since.value));
    before = events[events.length - 1];
    show(events[events.length - 1].seq, true);
  });
  prevBtn.addEventListener('click', () => {
    if (!history.length) return;
    show(history.pop(), false);
  });
  await show(0, false);
}

// ---------------------------------------------------------------------------------------------
// 5. Review

async function reviewPage(root, ctx) {
  await Promise.all([loadUpstreams(), loadAgents(), loadUsers()]);
  const review = await api('GET', '/v1/review');
  if (!ctx.alive) return;
  root.append(el('div', { class: 'page-head' }, el('h1', {}, 'Access review'),
    el('p', { class: 'lede' }, 'What each grant allowed against what its agent used. Actions never used are access nobody needed.')));
  const grants = review.grants.slice().sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
  const flagged = grants.filter((g) => g.unused_share > 0.5);
  root.append(el('div', { class: 'summary' },
    el('div', { class: 'stat' }, el('div', { class: 'big' }, String(grants.length)), 'grants'),
    el('div', { class: `stat${flagged.length ? ' warn' : ''}` }, el('div', { class: 'big' }, String(flagged.length)), 'over half unused'),
    el('div', { class: 'stat' }, el('div', { class: 'big' }, String(review.agents.length)), 'agents with live access')));

  const section = el('section', { class: 'panel' }, el('h2', {}, 'Grants'));
  if (!grants.length) section.append(el('div', { class: 'empty' }, 'No grants yet.'));
  for (const g of grants) {
    const used = new Map(g.actions_used.map((u) => [u.action, u]));
    const over = g.unused_share > 0.5;
    section.append(el('article', { class: `review-grant${over ? ' flagged' : ''}` },
      el('div', { class: 'review-head' },
        el('div', {}, el('div', { class: 'purpose' }, g.purpose),
          el('div', { class: 'small muted' }, el('span', { class: 'mono' }, g.id), ' · ', agentLabel(g.agent),
            S.me.admin ? [' · for ', subjectLabel(g.subject)] : null)),
        el('div', { class: 'review-flags' }, statusBadge(g.status),
          over ? badge(`${Math.round(g.unused_share * 100)} % never used`, 'risk-high') :
            badge(`${Math.round(g.unused_share * 100)} % unused`, 'info'))),
      el('table', { class: 'mini review-table' },
        el('thead', {}, el('tr', {}, el('th', {}, 'Action'), el('th', { class: 'num' }, 'Used'), el('th', {}, 'Last used'))),
        el('tbody', {}, g.actions_granted.map((a) => {
          const u = used.get(a);
          return el('tr', { class: u ? '' : 'unused' },
            el('td', {}, el('span', { class: `chip${isHigh(a) ? ' high' : ''}` }, a)),
            el('td', { class: 'num' }, u ? String(u.count) : 'never'),
            el('td', {}, u ? timeEl(u.last_used) : muted('—')));
        }))),
      el('div', { class: 'small muted' }, `Approvals: ${g.approvals.asked} asked, ${g.approvals.given} given · created `,
        timeEl(g.created_at), ' · expires ', timeEl(g.expires_at))));
  }

  const agents = el('section', { class: 'panel' }, el('h2', {}, 'Agents with live access'));
  if (!review.agents.length) agents.append(el('div', { class: 'empty' }, 'No agent holds a live grant.'));
  else {
    agents.append(el('table', { class: 'table' },
      el('thead', {}, el('tr', {}, ['Agent', 'Live grants', 'Live actions', 'Oldest live grant'].map((h) => el('th', {}, h)))),
      el('tbody', {}, review.agents.map((a) => el('tr', { class: a.standing ? 'flagged' : '' },
        el('td', { class: 'c-agent' }, agentLabel(a.agent)),
        el('td', { class: 'c-ids' }, a.live_grants.map((id) => el('div', { class: 'mono small' }, id))),
        el('td', {}, el('div', { class: 'actions-list' }, a.live_actions.map((x) => el('span', { class: `chip${isHigh(x) ? ' high' : ''}` }, x)))),
        el('td', { class: 'c-time' }, timeEl(a.oldest_live_grant_at), a.standing ? el('div', {}, badge('standing access: over a day', 'risk-high')) : null))))));
  }
  root.append(section, agents);
}

// ---------------------------------------------------------------------------------------------
// 6. Admin

async function adminPage(root, ctx, sub) {
  if (!S.me.admin) {
    root.append(el('section', { class: 'panel center' }, el('h1', {}, 'Admin only'),
      el('p', {}, 'This page is for Leash administrators.')));
    return;
  }
  const tab = ['agents', 'grants', 'users'].includes(sub[0]) ? sub[0] : 'agents';
  root.append(el('div', { class: 'page-head' }, el('h1', {}, 'Admin'),
    el('nav', { class: 'tabs' }, [['agents', 'Agents'], ['grants', 'All grants'], ['users', 'Users']].map(([t, label]) =>
      el('a', { href: `#/admin/${t}`, class: t === tab ? 'active' : '' }, label)))));
  if (tab === 'agents') await adminAgents(root, ctx);
  else if (tab === 'grants') await adminGrants(root, ctx);
  else await adminUsers(root, ctx);
}

async function adminAgents(root, ctx) {
  const slot = el('div', {});
  const draw = async () => {
    await loadAgents(true);
    if (!ctx.alive) return;
    const agents = [...S.agents.values()];
    clear(slot).append(agents.length ? el('table', { class: 'table' },
      el('thead', {}, el('tr', {}, ['Agent', 'Name', 'Keys', 'Status', 'Registered', ''].map((h) => el('th', {}, h)))),
      el('tbody', {}, agents.map((a) => el('tr', { class: a.status === 'active' ? '' : 'ended' },
        el('td', { class: 'mono c-agent' }, a.id), el('td', {}, a.name),
        el('td', { class: 'small nowrap' }, ((a.jwks && Array.isArray(a.jwks.keys)) ? a.jwks.keys : []).map((k) =>
          el('div', { class: 'mono' }, `${k.kty || '?'}${k.crv ? `/${k.crv}` : ''}${k.kid ? ` ${k.kid}` : ''}`))),
        el('td', {}, statusBadge(a.status)), el('td', { class: 'c-time' }, timeEl(a.created_at)),
        el('td', { class: 'row-actions' }, a.status === 'active' ? confirmButton('Disable',
          'Disable this agent? It gets no new token and every grant it holds is revoked.', 'Yes, disable',
          async () => { await api('POST', `/v1/agents/${encodeURIComponent(a.id)}/disable`); await draw(); }) : null))))) :
      el('div', { class: 'empty' }, 'No agents registered.'));
  };
  const id = el('input', { id: 'ag-id', type: 'text', required: true, spellcheck: false, placeholder: 'spiffe://example.org/agent/mailbot' });
  const name = el('input', { id: 'ag-name', type: 'text', placeholder: 'Mail assistant' });
  const jwks = el('textarea', { id: 'ag-jwks', rows: 5, spellcheck: false, placeholder: '{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "…"}]}' });
  const status = el('div', { class: 'form-status' });
  const submit = el('button', { type: 'submit', class: 'primary' }, 'Register');
  const form = el('form', { class: 'panel form' }, el('h2', {}, 'Register an agent'),
    el('div', { class: 'row' },
      el('div', { class: 'field wide' }, el('label', { htmlFor: 'ag-id' }, 'Id (URI)'), id),
      el('div', { class: 'field' }, el('label', { htmlFor: 'ag-name' }, 'Name'), name)),
    el('div', { class: 'field' }, el('label', { htmlFor: 'ag-jwks' }, 'Public keys (JWK Set)'), jwks,
      el('div', { class: 'help' }, 'Public keys only (Ed25519 or P-256); `leash agent keygen` makes one.')),
    el('div', { class: 'form-actions' }, submit, status));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clear(status);
    let set;
    try {
      set = JSON.parse(jwks.value);
    } catch (_) {
      status.append(el('div', { class: 'error-line' }, 'The key set is not JSON.'));
      return;
    }
    if (set && set.kty) set = { keys: [set] };
    const body = { id: id.value.trim(), jwks: set };
    if (name.value.trim()) body.name = name.value.trim();
    submit.disabled = true;
    try {
      await api('POST', '/v1/agents', body);
      form.reset();
      status.append(el('span', { class: 'ok-text' }, 'Registered.'));
      await draw();
    } catch (e) {
      status.append(errorLine(e));
    } finally {
      submit.disabled = false;
    }
  });
  root.append(el('section', { class: 'panel' }, el('h2', {}, 'Agents'), slot), form);
  await draw();
}

async function adminGrants(root, ctx) {
  await Promise.all([loadUpstreams(), loadAgents(), loadUsers()]);
  const slot = el('div', {});
  const activeOnly = el('input', { type: 'checkbox', id: 'ad-active', checked: true });
  const draw = async () => {
    await loadGrants(true);
    if (!ctx.alive) return;
    const all = sortGrants([...S.grants.values()]);
    clear(slot).append(grantsTable(activeOnly.checked ? all.filter((g) => g.status === 'active') : all,
      { withSubject: true, onChange: draw }));
  };
  activeOnly.addEventListener('change', draw);
  root.append(el('section', { class: 'panel' },
    el('div', { class: 'section-head' }, el('h2', {}, 'All grants'), el('label', { class: 'inline' }, activeOnly, ' active only')), slot));
  await draw();
}

async function adminUsers(root, ctx) {
  const slot = el('div', {});
  const draw = async () => {
    const users = await loadUsers(true);
    if (!ctx.alive) return;
    // UserView has no status today; a column appears if the server adds `status` or `disabled`.
    const withStatus = [...users.values()].some((u) => 'status' in u || 'disabled' in u);
    clear(slot).append(users.size ? el('table', { class: 'table' },
      el('thead', {}, el('tr', {}, ['Name', 'Id', 'Created', withStatus ? 'Status' : null, ''].filter((h) => h !== null).map((h) => el('th', {}, h)))),
      el('tbody', {}, [...users.values()].map((u) => el('tr', { class: u.disabled || u.status === 'disabled' ? 'ended' : '' },
        el('td', {}, el('strong', {}, u.name), u.id === S.me.id ? muted(' (you)') : null),
        el('td', { class: 'mono' }, u.id), el('td', { class: 'c-time' }, timeEl(u.created_at)),
        withStatus ? el('td', {}, typeof u.status === 'string' ? statusBadge(u.status) : statusBadge(u.disabled ? 'disabled' : 'active')) : null,
        el('td', { class: 'row-actions' }, ID_RE.test(u.id) && u.id !== S.me.id && !(u.disabled || u.status === 'disabled')
          ? confirmButton('Disable', 'Disable this human? Their sessions and API keys stop working and every grant they made is revoked.',
            'Yes, disable', async () => { await api('POST', `/v1/users/${idp(u.id)}/disable`); await draw(); })
          : null))))) :
      el('div', { class: 'empty' }, 'No users.'));
  };
  root.append(el('section', { class: 'panel' }, el('h2', {}, 'Users'), slot));
  await draw();
}

// ---------------------------------------------------------------------------------------------
// Start

async function start() {
  let me;
  try {
    me = await api('GET', '/v1/me', undefined, { allow401: true, raw: true });
  } catch (e) {
    loggedOut(`Leash could not be asked who you are: ${e.message}`);
    return;
  }
  if (me.status === 401) {
    loggedOut();
    return;
  }
  const body = await me.json();
  S.me = { id: typeof body.id === 'string' ? body.id : null, name: String(body.name || body.id || 'admin'), admin: body.admin === true };
  S.showAll = S.me.admin && !S.me.id;
  window.addEventListener('hashchange', route);
  setInterval(refreshTimes, 15000);
  setInterval(() => {
    // Countdowns on approval cards, every second, without touching anything else.
    if (page && page.alive) for (const fn of S.listeners) fn();
  }, 1000);
  pollApprovals();
  route();
}

start();
