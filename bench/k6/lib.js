// Shared by the stock-k6 scripts: settings from -e, HS256 tokens signed with k6/crypto, one query call.
import http from 'k6/http';
import crypto from 'k6/crypto';
import encoding from 'k6/encoding';
import { check } from 'k6';

export const BASE_URL = __ENV.BASE_URL || 'http://127.0.0.1:8080';
export const TENANTS = parseInt(__ENV.TENANTS || '10', 10);
export const ROWS = parseInt(__ENV.ROWS || '10000', 10); // rows seeded by schema.sql
const SECRET = __ENV.JWT_SECRET || '';
const ISSUER = __ENV.JWT_ISSUER || '';
const AUDIENCE = __ENV.JWT_AUDIENCE || '';
const ROLE = __ENV.JWT_ROLE || 'tenant_user';
// TOKENS: tokens made elsewhere, comma-separated (token i is tenant t<i>); else JWT_SECRET signs them here
const GIVEN = (__ENV.TOKENS || '').split(',').filter((token) => token.length > 0);

export function token(tenant, serial) {
  if (GIVEN.length > 0) {
    return GIVEN[tenant % GIVEN.length];
  }
  if (!SECRET) {
    throw new Error('set JWT_SECRET (HS256) or TOKENS');
  }
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub: `k6-${tenant}-${serial}`, role: ROLE, tenant_id: `t${tenant}`, iat: now - 5, exp: now + 3600 };
  if (ISSUER) claims.iss = ISSUER;
  if (AUDIENCE) claims.aud = AUDIENCE;
  const header = encoding.b64encode(JSON.stringify({ alg: 'HS256', typ: 'JWT' }), 'rawurl');
  const payload = encoding.b64encode(JSON.stringify(claims), 'rawurl');
  const signature = crypto.hmac('sha256', SECRET, `${header}.${payload}`, 'base64rawurl');
  return `${header}.${payload}.${signature}`;
}

// One POST /v1/query: `body` is {query, params} or a list of them (one transaction).
export function query(jwt, body, tags) {
  const response = http.post(`${BASE_URL}/v1/query`, JSON.stringify(body), {
    headers: { Authorization: `Bearer ${jwt}`, 'Content-Type': 'application/json' },
    tags: tags || {},
  });
  check(response, { 'status 200': (r) => r.status === 200 });
  return response;
}

// An id of a seeded row that belongs to `tenant` (schema.sql: tenant of id n is t<n % TENANTS>).
export function rowOf(tenant) {
  const slots = Math.floor(ROWS / TENANTS);
  return tenant + TENANTS * (1 + Math.floor(Math.random() * (slots - 1)));
}
