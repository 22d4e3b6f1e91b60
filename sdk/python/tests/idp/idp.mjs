// A real OpenID Provider for Leash's OIDC tests: npm `oidc-provider`, unmodified, with its own
// in-memory storage, a username+password login page and automatic consent.
//
//   node idp.mjs [config.json]        (or the JSON in the IDP_CONFIG environment variable)
//
// Configuration (JSON):
//   port       TCP port on 127.0.0.1; 0 (default) picks a free one
//   issuer     default http://127.0.0.1:<port>; give one only with a fixed port
//   clients    [{client_id, client_secret, redirect_uris, token_endpoint_auth_method}], the last
//              one of client_secret_basic (default) and client_secret_post; `client` (one) works
//              too. Every client may also redirect to <issuer>/harness/callback, a page of this
//              IdP that answers 200, so a test can finish a flow without a relying party.
//              A client with `"resource_server": true` is a protected resource's (an API's): no
//              grant types, no redirects, and it may introspect every token; any other client
//              may introspect only its own tokens. The same client authentication serves the
//              token, revocation and introspection endpoints.
//   accounts   {"alice": {"password", "email", "groups", "sub", "name"}, ...}; `sub` defaults to
//              the user name, `email` to <name>@example.com, `groups` to []
//   audience   optional: the only resource indicators (RFC 8707) accepted, a string or a list;
//              without it any http(s) URL is accepted
//   sso        false (default): every authorization request shows the login page, so a second
//              login never reuses the first user's IdP session; true: the IdP session (10 min)
//              is reused unless the request says prompt=login
//   access_token_ttl   seconds an opaque access token (one without `resource`) lives; default 600
//   refresh_tokens     false (default); true: every client (but a resource server's) has the grant
//              types authorization_code and refresh_token, every code grant issues a refresh
//              token (no offline_access or prompt=consent needed), and every refresh rotates it:
//              the old one is consumed, and presenting it again fails with invalid_grant and
//              revokes the whole grant (the new refresh token and every access token with it)
//   refresh_token_ttl  seconds a refresh token lives (with refresh_tokens); default 86400. A
//              grant lives as long as the longest of its tokens may.
//   scopes     plain OAuth scopes (e.g. ["mail.read"]) that clients may request, with or without
//              `openid`, and that are granted at once; other unknown scopes are dropped silently
//
// Prints `IDP READY <issuer>` on stdout once listening. Then reads commands, one JSON object a
// line, on stdin, and answers each with one line, `IDP OK`, `IDP OK <json>` (a command that
// answers with data) or `IDP ERROR <message>`:
//   {"set_redirect_uris": {"client_id": "...", "redirect_uris": ["..."]}}
//       (a relying party's port is known only after it starts, and it needs the issuer to start)
//   {"stats": {}}
//       -> {"authorization_code": n, "refresh_token": n, "refresh_token_failed": n,
//           "revoked": n, "injected_failures": n}: the token endpoint's successful grants by
//       grant type, its failed refresh grants (oidc-provider's answer, any error), the revocation
//       endpoint's 200 answers (RFC 7009 answers 200 for an unknown token too), and the token
//       requests that fail_token_endpoint answered
//   {"revoke_refresh_tokens": {"sub": "..."}}
//       -> {"revoked": n}: destroys every refresh token of that account (n: those still usable)
//       with its grant and the grant's other tokens, as if the person revoked the app
//   {"fail_token_endpoint": {"status": 503, "count": n}}
//       the next n token requests (POST /token) are answered `status` with the JSON body
//       {"error":"temporarily_unavailable"} before oidc-provider sees them
//
// Token requests are handled one at a time, so that two concurrent refreshes with one refresh
// token are one refresh and one reuse (invalid_grant, the grant revoked), as at a strict server.
// Revocation (RFC 7009) and introspection (RFC 7662) are enabled; authorization responses carry
// `iss` (RFC 9207). Access and refresh tokens do not end with the IdP's login session.
//
// ID tokens carry the claims of the granted scopes (conformIdTokenClaims: false): `email`
// (email, email_verified), `profile` (preferred_username, name, groups), `groups` (groups).
// A token request with `resource` gets a JWT access token (typ at+jwt, RFC 9068) whose `aud` is
// that resource and which carries `groups`, `email` and `preferred_username`.
// A request without `resource` gets an opaque access token (introspect it) with the granted
// scopes, e.g. `openid mail.read`.
// PKCE (S256) is required of every client; authorization codes are single use.
// Logs nothing secret: no passwords, codes or tokens.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createInterface } from 'node:readline';

import Provider, { errors, interactionPolicy } from 'oidc-provider';

const config = JSON.parse(
  process.argv[2] ? readFileSync(process.argv[2], 'utf8') : process.env.IDP_CONFIG ?? '{}',
);
const accounts = new Map(
  Object.entries(config.accounts ?? {}).map(([username, account]) => [
    username,
    {
      username,
      password: account.password,
      sub: account.sub ?? username,
      email: account.email ?? `${username}@example.com`,
      name: account.name ?? username,
      groups: account.groups ?? [],
    },
  ]),
);
const bySub = new Map([...accounts.values()].map((account) => [account.sub, account]));
const audiences = config.audience === undefined ? undefined : [config.audience].flat();
const refreshTokens = config.refresh_tokens === true;
const accessTokenTTL = config.access_token_ttl ?? 600;
const refreshTokenTTL = config.refresh_token_ttl ?? 86400;
const extraScopes = config.scopes ?? [];

function claimsOf(account) {
  return {
    sub: account.sub,
    email: account.email,
    email_verified: true,
    preferred_username: account.username,
    name: account.name,
    groups: account.groups,
  };
}

// Storage for oidc-provider's models, in memory; clients come from `clients`, which the stdin
// command can change.
const clients = new Map();
const stored = new Map();
const grants = new Map();
const byUid = new Map();
const byUserCode = new Map();

// The models that a grant's revocation (e.g. at a code's replay) deletes.
const GRANTABLE = new Set([
  'AccessToken',
  'AuthorizationCode',
  'RefreshToken',
  'DeviceCode',
  'BackchannelAuthenticationRequest',
]);

class Storage {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    const expiresAt = expiresIn ? Date.now() + expiresIn * 1000 : Infinity;
    stored.set(key, { payload, expiresAt });
    if (payload.grantId && GRANTABLE.has(this.model)) {
      if (!grants.has(payload.grantId)) grants.set(payload.grantId, new Set());
      grants.get(payload.grantId).add(key);
    }
    if (payload.uid) byUid.set(payload.uid, id);
    if (payload.userCode) byUserCode.set(payload.userCode, id);
  }

  async find(id) {
    if (this.model === 'Client') {
      return clients.get(id);
    }
    const entry = stored.get(this.key(id));
    if (!entry) return undefined;
    if (entry.expiresAt <= Date.now()) {
      stored.delete(this.key(id));
      return undefined;
    }
    return entry.payload;
  }

  async findByUid(uid) {
    const id = byUid.get(uid);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = byUserCode.get(userCode);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const entry = stored.get(this.key(id));
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    stored.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const key of grants.get(grantId) ?? []) stored.delete(key);
    grants.delete(grantId);
  }
}

// Destroys every refresh token of the account `sub`, with its grant and the grant's tokens;
// answers how many of them were still usable.
function revokeRefreshTokens(sub) {
  let revoked = 0;
  const now = Date.now();
  for (const [key, { payload, expiresAt }] of [...stored.entries()]) {
    if (!key.startsWith('RefreshToken:') || payload.accountId !== sub) continue;
    if (!payload.consumed && expiresAt > now) revoked += 1;
    stored.delete(key);
    if (payload.grantId) {
      for (const tokenKey of grants.get(payload.grantId) ?? []) stored.delete(tokenKey);
      grants.delete(payload.grantId);
      stored.delete(`Grant:${payload.grantId}`);
    }
  }
  return revoked;
}

const stats = {
  authorization_code: 0,
  refresh_token: 0,
  refresh_token_failed: 0,
  revoked: 0,
  injected_failures: 0,
};
// fail_token_endpoint's pending failures.
let tokenFailures = { status: 503, count: 0 };

const server = createServer();
await new Promise((resolve) => {
  server.listen(config.port ?? 0, '127.0.0.1', resolve);
});
const issuer = config.issuer ?? `http://127.0.0.1:${server.address().port}`;
const harnessCallback = `${issuer}/harness/callback`;
// The clients of protected resources, which may introspect every token.
const resourceServers = new Set();

function setClient({ resource_server: resourceServer, ...metadata }) {
  if (resourceServer || resourceServers.has(metadata.client_id)) {
    resourceServers.add(metadata.client_id);
    clients.set(metadata.client_id, {
      token_endpoint_auth_method: 'client_secret_basic',
      ...metadata,
      grant_types: [],
      response_types: [],
      redirect_uris: [],
    });
    return;
  }
  const redirectUris = [...(metadata.redirect_uris ?? [])];
  if (!redirectUris.includes(harnessCallback)) redirectUris.push(harnessCallback);
  clients.set(metadata.client_id, {
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: refreshTokens ? ['authorization_code', 'refresh_token'] : ['authorization_code'],
    response_types: ['code'],
    ...metadata,
    redirect_uris: redirectUris,
  });
}
for (const client of config.clients ?? (config.client ? [config.client] : [])) {
  setClient(client);
}

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = {
  ...privateKey.export({ format: 'jwk' }),
  kid: randomBytes(8).toString('hex'),
  use: 'sig',
  alg: 'RS256',
};

// Unless `sso`, the login page is shown on every authorization request, until this request's
// own login is submitted.
const policy = interactionPolicy.base();
policy
  .get('login')
  .checks.add(
    new interactionPolicy.Check('fresh_login', 'every authorization asks for a login', (ctx) =>
      config.sso ? false : !(ctx.oidc.route.endsWith('resume') && ctx.oidc.result?.login),
    ),
  );

const provider = new Provider(issuer, {
  adapter: Storage,
  jwks: { keys: [signingKey] },
  // Names of their own: cookies do not separate ports, so a client of both this IdP and a
  // relying party on 127.0.0.1 sends each one's cookies to the other.
  cookies: {
    keys: [randomBytes(32).toString('base64url')],
    names: { session: 'idp_session', interaction: 'idp_interaction', resume: 'idp_resume' },
  },
  findAccount: async (_ctx, sub) => {
    const account = bySub.get(sub);
    return account && { accountId: sub, claims: async () => claimsOf(account) };
  },
  scopes: ['openid', 'offline_access', ...extraScopes],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['preferred_username', 'name', 'groups'],
    groups: ['groups'],
  },
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  interactions: {
    policy,
    url: (_ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  // Tokens of an upstream's API outlive the person's login session at its IdP.
  expiresWithSession: async () => false,
  ...(refreshTokens && {
    issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
    rotateRefreshToken: () => true,
  }),
  features: {
    devInteractions: { enabled: false },
    revocation: { enabled: true },
    introspection: {
      enabled: true,
      allowedPolicy: async (_ctx, client, token) =>
        resourceServers.has(client.clientId) || token.clientId === client.clientId,
    },
    resourceIndicators: {
      enabled: true,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (_ctx, resource) => {
        if (!/^https?:\/\//.test(resource) || (audiences && !audiences.includes(resource))) {
          throw new errors.InvalidTarget();
        }
        return {
          scope: 'openid email profile groups',
          audience: resource,
          accessTokenFormat: 'jwt',
          accessTokenTTL: 600,
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  extraTokenClaims: async (_ctx, token) => {
    const account = bySub.get(token.accountId);
    return account && {
      groups: account.groups,
      email: account.email,
      preferred_username: account.username,
    };
  },
  clientBasedCORS: () => false,
  ttl: {
    AccessToken: accessTokenTTL,
    AuthorizationCode: 60,
    Grant: Math.max(600, accessTokenTTL, refreshTokens ? refreshTokenTTL : 0),
    RefreshToken: refreshTokenTTL,
    IdToken: 600,
    Interaction: 600,
    Session: 600,
  },
  renderError: async (ctx, out) => {
    ctx.type = 'html';
    ctx.body = `<!doctype html><title>IdP error</title><h1>${escape(out.error)}</h1>`
      + `<p>${escape(out.error_description ?? '')}</p>`;
  },
});
provider.on('server_error', (_ctx, error) => console.error('idp: server_error:', error));
provider.on('grant.success', (ctx) => {
  const grantType = ctx.oidc.params?.grant_type;
  if (grantType in stats) stats[grantType] += 1;
});
provider.on('grant.error', (ctx) => {
  if (ctx.oidc?.params?.grant_type === 'refresh_token') stats.refresh_token_failed += 1;
});
// oidc-provider has no event for a revocation; counted before the answer leaves.
provider.use(async (ctx, next) => {
  await next();
  if (ctx.oidc?.route === 'revocation' && ctx.status === 200) stats.revoked += 1;
});

function escape(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function loginPage(uid, { username = '', error } = {}) {
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in to the test IdP</title></head>
<body>
<h1>Sign in</h1>
${error ? `<p id="error" role="alert">${escape(error)}</p>` : ''}
<form id="login" method="post" action="/interaction/${escape(uid)}/login">
<label>Username <input id="username" name="username" autocomplete="username" value="${escape(username)}" autofocus></label>
<label>Password <input id="password" name="password" type="password" autocomplete="current-password"></label>
<button id="submit" type="submit">Sign in</button>
</form>
</body></html>`;
}

async function readForm(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 65536) throw new Error('form too large');
  }
  return new URLSearchParams(body);
}

function send(res, status, type, body) {
  res.statusCode = status;
  res.setHeader('Content-Type', type);
  res.setHeader('Cache-Control', 'no-store');
  res.end(body);
}

// The login page and automatic consent, for the interactions oidc-provider starts.
async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new errors.SessionNotFound('interaction mismatch');
  const { prompt, params, session } = details;
  if (prompt.name === 'login') {
    if (req.method === 'GET' && !action) {
      return send(res, 200, 'text/html; charset=utf-8', loginPage(uid));
    }
    if (req.method !== 'POST' || action !== 'login') {
      return send(res, 405, 'text/plain', 'method not allowed');
    }
    const form = await readForm(req);
    const username = form.get('username') ?? '';
    const account = accounts.get(username);
    if (!account || account.password === undefined || form.get('password') !== account.password) {
      return send(
        res,
        401,
        'text/html; charset=utf-8',
        loginPage(uid, { username, error: 'invalid username or password' }),
      );
    }
    return provider.interactionFinished(
      req,
      res,
      { login: { accountId: account.sub } },
      { mergeWithLastSubmission: false },
    );
  }
  if (prompt.name === 'consent') {
    // (A grant revoked since the interaction started is made anew.)
    const grant = (details.grantId && (await provider.Grant.find(details.grantId)))
      || new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const { missingOIDCScope, missingOIDCClaims, missingResourceScopes } = prompt.details;
    if (missingOIDCScope) grant.addOIDCScope(missingOIDCScope.join(' '));
    if (missingOIDCClaims) grant.addOIDCClaims(missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    return provider.interactionFinished(req, res, { consent: { grantId } });
  }
  return send(res, 400, 'text/plain', `unknown prompt ${prompt.name}`);
}

const callback = provider.callback();
// The token requests, one at a time.
let tokenQueue = Promise.resolve();
server.on('request', async (req, res) => {
  const url = new URL(req.url, issuer);
  const match = /^\/interaction\/([\w-]+)(?:\/(login))?$/.exec(url.pathname);
  try {
    if (req.method === 'POST' && url.pathname === '/token') {
      if (tokenFailures.count > 0) {
        tokenFailures.count -= 1;
        stats.injected_failures += 1;
        req.resume();
        send(
          res,
          tokenFailures.status,
          'application/json',
          JSON.stringify({ error: 'temporarily_unavailable' }),
        );
        return;
      }
      const handled = tokenQueue.then(() => callback(req, res));
      tokenQueue = handled.catch(() => {});
      await handled;
    } else if (match) {
      await interaction(req, res, match[1], match[2]);
    } else if (url.pathname === '/harness/callback') {
      send(res, 200, 'text/plain', 'the test IdP harness callback\n');
    } else {
      callback(req, res);
    }
  } catch (error) {
    if (error instanceof errors.OIDCProviderError) {
      send(res, error.statusCode ?? 400, 'text/plain', `${error.error}: ${error.error_description}\n`);
    } else {
      console.error('idp: interaction failed:', error);
      send(res, 500, 'text/plain', 'interaction failed\n');
    }
  }
});

createInterface({ input: process.stdin }).on('line', (line) => {
  let answer;
  try {
    const command = JSON.parse(line);
    if (command.set_redirect_uris) {
      const { client_id: clientId, redirect_uris: redirectUris } = command.set_redirect_uris;
      const client = clients.get(clientId);
      if (!client) throw new Error(`no client ${clientId}`);
      setClient({ ...client, redirect_uris: redirectUris });
    } else if (command.stats) {
      answer = stats;
    } else if (command.revoke_refresh_tokens) {
      const { sub } = command.revoke_refresh_tokens;
      if (typeof sub !== 'string') throw new Error('revoke_refresh_tokens needs a sub');
      answer = { revoked: revokeRefreshTokens(sub) };
    } else if (command.fail_token_endpoint) {
      const { status, count } = command.fail_token_endpoint;
      if (!Number.isInteger(status) || status < 400 || status > 599) {
        throw new Error('fail_token_endpoint needs a status 400..599');
      }
      if (!Number.isInteger(count) || count < 0) {
        throw new Error('fail_token_endpoint needs a count >= 0');
      }
      tokenFailures = { status, count };
    } else {
      throw new Error('unknown command');
    }
    console.log(answer === undefined ? 'IDP OK' : `IDP OK ${JSON.stringify(answer)}`);
  } catch (error) {
    console.log(`IDP ERROR ${error.message}`);
  }
});

console.log(`IDP READY ${issuer}`);
