// A real OAuth 2.0 / OpenID Connect authorization server for keyrelay's tests.
//
// It is `oidc-provider` (https://github.com/panva/node-oidc-provider), a certified,
// standards-compliant implementation, with a small test-control API in front of it.
// Everything that is not under /__test/ and not hit by an injected fault is answered by
// the real provider. Test-only: in-memory storage, development signing keys, dev login
// and consent pages that accept any login name. Binds 127.0.0.1 only.
//
// Environment:
//   PORT               TCP port on 127.0.0.1; 0 (the default) picks a free one.
//   ACCESS_TOKEN_TTL   access token lifetime in seconds (default 3600; small values such
//                      as 2 work).
//   REFRESH_TOKEN_TTL  refresh token lifetime in seconds (default 86400). Each rotated
//                      refresh token gets a fresh lifetime.
//   REDIRECT_URIS      comma-separated redirect URIs registered for both clients
//                      (default http://127.0.0.1:8765/callback). Matched exactly.
//   CLIENT_SECRET      secret of `keyrelay-confidential` (default test-secret).
//   APPLICATION_TYPE   `web` (default: exact redirect URI match) or `native` (loopback
//                      redirect URIs match with any port, RFC 8252).
//
// Clients (grant types authorization_code + refresh_token, response type code, PKCE S256
// required for both):
//   keyrelay-public        token_endpoint_auth_method none
//   keyrelay-confidential  token_endpoint_auth_method client_secret_basic
//
// Behaviour the tests rely on:
//   * a refresh token is issued on every code exchange (with or without offline_access)
//     and rotated on every refresh;
//   * presenting a rotated (already used) refresh token, or replaying an authorization
//     code, revokes the whole grant (all its tokens), without any grace period;
//   * revocation (RFC 7009) at /token/revocation, userinfo at /me.
//
// When listening, exactly one line goes to stdout:
//   {"ready": true, "issuer": "http://127.0.0.1:<port>", "port": <port>}
// Everything else (oidc-provider notices and warnings) goes to stderr.
//
// Test-control API (JSON in, JSON out; not part of the OAuth API):
//   GET  /__test/stats        counters since start or the last reset:
//        {"token_calls": {"<grant_type>": n}, "token_errors": {"<error>": n},
//         "token_success": {"<grant_type>": n}, "faulted": n,
//         "faulted_by_mode": {"<mode>": n}, "grants_revoked": n, "reuse_detected": n,
//         "code_replay_detected": n, "user_revocations": n}
//        token_calls counts every request that reached the token endpoint, by its
//        grant_type, as it arrives (before any fault or delay), including those answered
//        by an injected fault. "faulted" counts requests that got a fault (`delay`,
//        `delay_response` and `reset_after` ones too, though the provider handles them);
//        token_success and token_errors count what the real provider answered
//        (token_errors by `error` code), whether or not that answer reached the client.
//        reuse_detected: a rotated refresh token was presented again (grant revoked);
//        code_replay_detected: an authorization code was presented again (grant revoked);
//        grants_revoked: grants revoked by the provider (reuse, replay, RFC 7009
//        revocation of a refresh token) plus those revoked via POST /__test/revoke.
//   POST /__test/stats/reset  zeroes the counters.
//   POST /__test/fault   {"mode": "none"|"status503"|"html502"|"hang"|"reset"|"delay"
//                                 |"delay_response"|"reset_after",
//                         "delay_ms": int, "count": int}
//        the next `count` token-endpoint requests (-1, the default: until changed) get
//        the fault. Before the provider sees the request (nothing is processed, a
//        refresh token or code stays usable):
//          status503 → 503 {"error":"temporarily_unavailable"}; html502 → 502 with an
//          HTML body; hang → no answer, the socket stays open; reset → the socket is
//          destroyed without a response; delay → wait delay_ms, then the real provider
//          handles the request and its answer is sent.
//        After the provider handled the request (a refresh token is already rotated, a
//        code already consumed; the answer is lost or late):
//          delay_response → the provider's answer is held back delay_ms, then sent (if
//          the client is still there); reset_after → the socket is destroyed and the
//          provider's answer is never sent.
//   POST /__test/revoke  {"sub": "<login name>"} → {"revoked": n}: revokes every grant of
//        that user (all their codes, access and refresh tokens), as when a user removes
//        the application's access in the provider's UI.

import * as http from 'node:http';

// oidc-provider prints notices with console.info (stdout); keep stdout for the ready line.
console.info = (...args) => console.error(...args);
console.log = (...args) => console.error(...args);

const { default: Provider } = await import('oidc-provider');

function intEnv(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number.parseInt(raw, 10);
  if (!Number.isFinite(value) || value < 0 || String(value) !== raw.trim()) {
    throw new Error(`${name} must be a non-negative integer, got ${JSON.stringify(raw)}`);
  }
  return value;
}

const PORT = intEnv('PORT', 0);
const ACCESS_TOKEN_TTL = intEnv('ACCESS_TOKEN_TTL', 3600);
const REFRESH_TOKEN_TTL = intEnv('REFRESH_TOKEN_TTL', 24 * 60 * 60);
const REDIRECT_URIS = (process.env.REDIRECT_URIS || 'http://127.0.0.1:8765/callback')
  .split(',')
  .map((uri) => uri.trim())
  .filter(Boolean);
const CLIENT_SECRET = process.env.CLIENT_SECRET || 'test-secret';
const APPLICATION_TYPE = process.env.APPLICATION_TYPE || 'web';
const CLIENT_IDS = new Set(['keyrelay-public', 'keyrelay-confidential']);
const FAULT_MODES = new Set([
  'none',
  'status503',
  'html502',
  'hang',
  'reset',
  'delay',
  'delay_response',
  'reset_after',
]);

// ---------------------------------------------------------------------------------------
// Storage: an in-memory adapter (like oidc-provider's own, but unbounded and enumerable,
// so that /__test/revoke can find a user's grants).

const store = new Map(); // `${model}:${id}` -> { payload, expiresAt }
const grantMembers = new Map(); // grantId -> Set of keys
const GRANTABLE = new Set([
  'AccessToken',
  'AuthorizationCode',
  'RefreshToken',
  'DeviceCode',
  'BackchannelAuthenticationRequest',
  'PreAuthorizedCode',
]);

function storeGet(key) {
  const entry = store.get(key);
  if (!entry) return undefined;
  if (entry.expiresAt !== undefined && entry.expiresAt <= Date.now()) {
    storeDelete(key);
    return undefined;
  }
  return entry.payload;
}

function storeDelete(key) {
  const entry = store.get(key);
  store.delete(key);
  const grantId = entry?.payload?.grantId;
  if (grantId && grantMembers.has(grantId)) {
    const members = grantMembers.get(grantId);
    members.delete(key);
    if (members.size === 0) grantMembers.delete(grantId);
  }
}

function revokeGrantMembers(grantId) {
  const members = grantMembers.get(grantId);
  if (!members) return;
  grantMembers.delete(grantId);
  for (const key of members) store.delete(key);
}

class TestAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    if (store.has(key)) storeDelete(key);
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : undefined;
    store.set(key, { payload, expiresAt });
    if (GRANTABLE.has(this.model) && payload.grantId) {
      if (!grantMembers.has(payload.grantId)) grantMembers.set(payload.grantId, new Set());
      grantMembers.get(payload.grantId).add(key);
    }
  }

  async find(id) {
    return storeGet(this.key(id));
  }

  async findByUid(uid) {
    for (const key of store.keys()) {
      if (!key.startsWith(`${this.model}:`)) continue;
      const payload = storeGet(key);
      if (payload?.uid === uid) return payload;
    }
    return undefined;
  }

  async findByUserCode(userCode) {
    for (const key of store.keys()) {
      if (!key.startsWith(`${this.model}:`)) continue;
      const payload = storeGet(key);
      if (payload?.userCode === userCode) return payload;
    }
    return undefined;
  }

  async consume(id) {
    const payload = storeGet(this.key(id));
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    storeDelete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    revokeGrantMembers(grantId);
  }
}

// ---------------------------------------------------------------------------------------
// Counters and faults.

function freshStats() {
  return {
    token_calls: { authorization_code: 0, refresh_token: 0 },
    token_success: { authorization_code: 0, refresh_token: 0 },
    token_errors: { invalid_grant: 0 },
    faulted: 0,
    faulted_by_mode: {},
    grants_revoked: 0,
    reuse_detected: 0,
    code_replay_detected: 0,
    user_revocations: 0,
  };
}

let stats = freshStats();
let fault = { mode: 'none', delayMs: 0, remaining: 0 };

function bump(table, key) {
  table[key] = (table[key] || 0) + 1;
}

// Takes one fault "ticket" for a token-endpoint request; returns the fault to apply.
function takeFault() {
  if (fault.mode === 'none' || fault.remaining === 0) return undefined;
  const current = { mode: fault.mode, delayMs: fault.delayMs };
  if (fault.remaining > 0) {
    fault.remaining -= 1;
    if (fault.remaining === 0) fault = { mode: 'none', delayMs: 0, remaining: 0 };
  }
  return current;
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

function grantTypeOf(body, contentType) {
  if ((contentType || '').includes('application/json')) {
    try {
      return JSON.parse(body).grant_type || 'unknown';
    } catch {
      return 'unknown';
    }
  }
  return new URLSearchParams(body).get('grant_type') || 'unknown';
}

function sleep(ms) {
  return new Promise((resolve) => { setTimeout(resolve, ms); });
}

// Destroys the connection without an HTTP answer (a TCP RST where Node supports it).
function resetSocket(socket) {
  if (socket.destroyed) return;
  if (typeof socket.resetAndDestroy === 'function') {
    socket.resetAndDestroy();
  } else {
    socket.destroy();
  }
}

function sendJson(ctx, status, body) {
  ctx.status = status;
  ctx.type = 'application/json';
  ctx.body = JSON.stringify(body);
}

// ---------------------------------------------------------------------------------------
// The provider.

const listener = http.createServer();
await new Promise((resolve, reject) => {
  listener.once('error', reject);
  listener.listen(PORT, '127.0.0.1', () => {
    listener.off('error', reject);
    resolve();
  });
});
const { port } = listener.address();
const issuer = `http://127.0.0.1:${port}`;

function clientMetadata(extra) {
  return {
    application_type: APPLICATION_TYPE,
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: REDIRECT_URIS,
    ...extra,
  };
}

const provider = new Provider(issuer, {
  adapter: TestAdapter,
  clients: [
    clientMetadata({ client_id: 'keyrelay-public', token_endpoint_auth_method: 'none' }),
    clientMetadata({
      client_id: 'keyrelay-confidential',
      client_secret: CLIENT_SECRET,
      token_endpoint_auth_method: 'client_secret_basic',
    }),
  ],
  async findAccount(_ctx, sub) {
    return {
      accountId: sub,
      async claims() {
        return {
          sub,
          name: sub,
          preferred_username: sub,
          email: `${sub}@example.test`,
          email_verified: true,
        };
      },
    };
  },
  scopes: ['openid', 'offline_access', 'profile', 'email'],
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email', 'email_verified'],
  },
  cookies: { keys: ['keyrelay-test-cookie-key-not-a-secret'] },
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true },
    revocation: { enabled: true },
    userinfo: { enabled: true },
    // No `resource` parameter → an opaque access token usable at the userinfo endpoint.
    // A `resource` parameter is refused with invalid_target (no resource servers here).
    resourceIndicators: { enabled: true },
  },
  // Always issue a refresh token to our clients (not only with offline_access), and make
  // it independent of the login session.
  async issueRefreshToken(_ctx, client) {
    return client.grantTypeAllowed('refresh_token');
  },
  async expiresWithSession() {
    return false;
  },
  rotateRefreshToken: true,
  ttl: {
    AccessToken: ACCESS_TOKEN_TTL,
    AuthorizationCode: 60,
    IdToken: 3600,
    RefreshToken: REFRESH_TOKEN_TTL,
    Interaction: 3600,
    Session: 24 * 60 * 60,
    Grant: Math.max(REFRESH_TOKEN_TTL * 10, 24 * 60 * 60),
  },
});

provider.on('grant.error', (ctx, err) => {
  bump(stats.token_errors, err.error || 'unknown');
  if (err.error === 'invalid_grant' && err.error_detail === 'refresh token already used') {
    stats.reuse_detected += 1;
  }
  if (err.error === 'invalid_grant' && err.error_detail === 'authorization code already consumed') {
    stats.code_replay_detected += 1;
  }
});
provider.on('grant.success', (ctx) => {
  bump(stats.token_success, ctx.oidc?.params?.grant_type || 'unknown');
});
provider.on('grant.revoked', () => {
  stats.grants_revoked += 1;
});
provider.on('server_error', (_ctx, err) => {
  console.error('oidc-provider server_error:', err);
});

function revokeUser(sub) {
  const grantIds = [];
  for (const [key, entry] of store) {
    if (key.startsWith('Grant:') && entry.payload?.accountId === sub) {
      grantIds.push(key.slice('Grant:'.length));
    }
  }
  for (const grantId of grantIds) {
    revokeGrantMembers(grantId);
    storeDelete(`Grant:${grantId}`);
  }
  // Codes or tokens whose grant record is gone already still belong to the user.
  for (const [key, entry] of [...store]) {
    const model = key.slice(0, key.indexOf(':'));
    if (GRANTABLE.has(model) && entry.payload?.accountId === sub) storeDelete(key);
  }
  stats.grants_revoked += grantIds.length;
  stats.user_revocations += 1;
  return grantIds.length;
}

async function testApi(ctx) {
  const route = `${ctx.method} ${ctx.path}`;
  let body = {};
  if (ctx.method === 'POST') {
    const raw = await readBody(ctx.req);
    if (raw.trim()) {
      try {
        body = JSON.parse(raw);
      } catch {
        return sendJson(ctx, 400, { error: 'body is not JSON' });
      }
    }
  }
  switch (route) {
    case 'GET /__test/stats':
      return sendJson(ctx, 200, stats);
    case 'POST /__test/stats/reset':
      stats = freshStats();
      return sendJson(ctx, 200, stats);
    case 'POST /__test/fault': {
      const mode = body.mode ?? 'none';
      const delayMs = body.delay_ms ?? 0;
      const count = body.count ?? -1;
      if (!FAULT_MODES.has(mode)) {
        return sendJson(ctx, 400, { error: `unknown mode ${JSON.stringify(mode)}` });
      }
      if (!Number.isInteger(delayMs) || delayMs < 0 || !Number.isInteger(count) || count < -1) {
        return sendJson(ctx, 400, { error: 'delay_ms must be >= 0 and count >= -1 (integers)' });
      }
      fault = mode === 'none' || count === 0
        ? { mode: 'none', delayMs: 0, remaining: 0 }
        : { mode, delayMs, remaining: count };
      return sendJson(ctx, 200, { mode: fault.mode, delay_ms: fault.delayMs, count: fault.remaining });
    }
    case 'POST /__test/revoke': {
      if (typeof body.sub !== 'string' || !body.sub) {
        return sendJson(ctx, 400, { error: 'sub (string) is required' });
      }
      return sendJson(ctx, 200, { revoked: revokeUser(body.sub) });
    }
    default:
      return sendJson(ctx, 404, { error: `no test route ${route}` });
  }
}

const tokenPath = new URL(provider.urlFor('token')).pathname;

provider.use(async (ctx, next) => {
  if (ctx.path.startsWith('/__test/')) {
    await testApi(ctx);
    return;
  }
  if (ctx.method !== 'POST' || ctx.path !== tokenPath) {
    await next();
    return;
  }

  // Count the request as it arrives (before any fault or delay). The body is read here and
  // handed to the provider as an already-parsed string (oidc-provider accepts that and
  // warns once on stderr).
  const raw = await readBody(ctx.req);
  ctx.req.body = raw;
  ctx.request.body = raw;
  bump(stats.token_calls, grantTypeOf(raw, ctx.get('content-type')));

  const injected = takeFault();
  if (injected) {
    stats.faulted += 1;
    bump(stats.faulted_by_mode, injected.mode);
  }
  switch (injected?.mode) {
    case undefined:
      break;
    case 'status503':
      sendJson(ctx, 503, {
        error: 'temporarily_unavailable',
        error_description: 'injected fault: the token endpoint is unavailable',
      });
      ctx.set('Cache-Control', 'no-store');
      return;
    case 'html502':
      ctx.status = 502;
      ctx.type = 'text/html';
      ctx.body = '<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>'
        + '<body><h1>502 Bad Gateway</h1><p>injected fault</p></body></html>\n';
      return;
    case 'hang':
      // Never answer; the socket stays open until the client gives up.
      ctx.respond = false;
      return;
    case 'reset':
      // Cut before the provider sees the request: nothing is processed.
      ctx.respond = false;
      resetSocket(ctx.req.socket);
      return;
    case 'delay':
      await sleep(injected.delayMs);
      break;
    case 'delay_response':
      // The provider handles the request now (a refresh token is rotated, a code
      // consumed); only its answer is held back. koa sends it when this middleware
      // returns, and skips it when the client has gone meanwhile (ctx.writable).
      await next();
      await sleep(injected.delayMs);
      return;
    case 'reset_after':
      // The provider handles the request, then the answer is lost with the connection.
      await next();
      ctx.respond = false;
      resetSocket(ctx.req.socket);
      return;
    default:
      throw new Error(`unhandled fault mode ${injected.mode}`);
  }
  await next();
});

// Static clients are validated lazily by oidc-provider; fail at startup instead.
for (const clientId of CLIENT_IDS) {
  try {
    if (!await provider.Client.find(clientId)) throw new Error('not registered');
  } catch (err) {
    console.error(`invalid configuration of client ${clientId}: ${err.error_description ?? err.message}`);
    process.exit(1);
  }
}

listener.on('request', provider.callback());
process.stdout.write(`{"ready": true, "issuer": ${JSON.stringify(issuer)}, "port": ${port}}\n`);

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    listener.closeAllConnections?.();
    listener.close(() => process.exit(0));
    setTimeout(() => process.exit(0), 500).unref();
  });
}
