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
//   accounts   {"alice": {"password", "email", "groups", "sub", "name"}, ...}; `sub` defaults to
//              the user name, `email` to <name>@example.com, `groups` to []
//   audience   optional: the only resource indicators (RFC 8707) accepted, a string or a list;
//              without it any http(s) URL is accepted
//   sso        false (default): every authorization request shows the login page, so a second
//              login never reuses the first user's IdP session; true: the IdP session (10 min)
//              is reused unless the request says prompt=login
//
// Prints `IDP READY <issuer>` on stdout once listening. Then reads commands, one JSON object a
// line, on stdin, and answers each with one line, `IDP OK` or `IDP ERROR <message>`:
//   {"set_redirect_uris": {"client_id": "...", "redirect_uris": ["..."]}}
// (a relying party's port is known only after it starts, and it needs the issuer to start).
//
// ID tokens carry the claims of the granted scopes (conformIdTokenClaims: false): `email`
// (email, email_verified), `profile` (preferred_username, name, groups), `groups` (groups).
// A token request with `resource` gets a JWT access token (typ at+jwt, RFC 9068) whose `aud` is
// that resource and which carries `groups`, `email` and `preferred_username`.
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

const server = createServer();
await new Promise((resolve) => {
  server.listen(config.port ?? 0, '127.0.0.1', resolve);
});
const issuer = config.issuer ?? `http://127.0.0.1:${server.address().port}`;
const harnessCallback = `${issuer}/harness/callback`;

function setClient(metadata) {
  const redirectUris = [...(metadata.redirect_uris ?? [])];
  if (!redirectUris.includes(harnessCallback)) redirectUris.push(harnessCallback);
  clients.set(metadata.client_id, {
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: ['authorization_code'],
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
  features: {
    devInteractions: { enabled: false },
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
    AccessToken: 600,
    AuthorizationCode: 60,
    Grant: 600,
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
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
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
server.on('request', async (req, res) => {
  const url = new URL(req.url, issuer);
  const match = /^\/interaction\/([\w-]+)(?:\/(login))?$/.exec(url.pathname);
  try {
    if (match) {
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
  try {
    const command = JSON.parse(line);
    if (command.set_redirect_uris) {
      const { client_id: clientId, redirect_uris: redirectUris } = command.set_redirect_uris;
      const client = clients.get(clientId);
      if (!client) throw new Error(`no client ${clientId}`);
      setClient({ ...client, redirect_uris: redirectUris });
    } else {
      throw new Error('unknown command');
    }
    console.log('IDP OK');
  } catch (error) {
    console.log(`IDP ERROR ${error.message}`);
  }
});

console.log(`IDP READY ${issuer}`);
