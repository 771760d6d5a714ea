// A write mix: 80% point reads, 10% single-statement updates, 10% two-statement transactions (a JSON
// list: an INSERT and an UPDATE, committed together). k6 run -e JWT_SECRET=... bench/k6/write_mix.js
import { check } from 'k6';
import { query, rowOf, token, TENANTS } from './lib.js';

export const options = {
  scenarios: {
    write_mix: {
      executor: 'constant-vus',
      vus: parseInt(__ENV.VUS || '8', 10),
      duration: __ENV.DURATION || '30s',
    },
  },
  thresholds: {
    http_req_failed: ['rate<0.01'],
    'http_req_duration{kind:read}': [`p(95)<${__ENV.READ_P95_MS || '50'}`],
    'http_req_duration{kind:write}': [`p(95)<${__ENV.WRITE_P95_MS || '100'}`],
    'http_req_duration{kind:transaction}': [`p(95)<${__ENV.TRANSACTION_P95_MS || '150'}`],
    checks: ['rate>0.99'],
  },
};

export function setup() {
  const tokens = [];
  for (let tenant = 0; tenant < TENANTS; tenant++) tokens.push(token(tenant, 0));
  return { tokens };
}

export default function (data) {
  const tenant = (__VU - 1) % TENANTS;
  const jwt = data.tokens[tenant];
  const dice = Math.random();
  if (dice < 0.8) {
    query(jwt, { query: 'SELECT value FROM k6_items WHERE id = $1', params: [rowOf(tenant)] }, { kind: 'read' });
  } else if (dice < 0.9) {
    const response = query(jwt, { query: 'UPDATE k6_items SET value = value + 1 WHERE id = $1', params: [rowOf(tenant)] },
      { kind: 'write' });
    check(response, { 'one row updated': (r) => r.status === 200 && r.json().command === 'UPDATE 1' });
  } else {
    const response = query(jwt, [
      { query: 'INSERT INTO k6_events (tenant_id, item_id) VALUES ($1, $2)', params: [`t${tenant}`, rowOf(tenant)] },
      { query: 'UPDATE k6_items SET value = value - 1 WHERE id = $1', params: [rowOf(tenant)] },
    ], { kind: 'transaction' });
    check(response, { 'both committed': (r) => r.status === 200 && r.json().results.length === 2 });
  }
}
