// Point reads by primary key through POST /v1/query, each VU as one tenant: latency thresholds.
// k6 run -e JWT_SECRET=... -e BASE_URL=http://127.0.0.1:8080 bench/k6/point_reads.js
import { check } from 'k6';
import { query, rowOf, token, TENANTS } from './lib.js';

export const options = {
  scenarios: {
    point_reads: {
      executor: 'constant-vus',
      vus: parseInt(__ENV.VUS || '8', 10),
      duration: __ENV.DURATION || '30s',
    },
  },
  thresholds: {
    http_req_failed: ['rate<0.01'],
    http_req_duration: [`p(95)<${__ENV.P95_MS || '50'}`, `p(99)<${__ENV.P99_MS || '200'}`],
    checks: ['rate>0.99'],
  },
};

export function setup() {
  // every VU's token made once, here: the proxy validates each once and caches it
  const tokens = [];
  for (let tenant = 0; tenant < TENANTS; tenant++) tokens.push(token(tenant, 0));
  return { tokens };
}

export default function (data) {
  const tenant = (__VU - 1) % TENANTS;
  const id = rowOf(tenant);
  const response = query(data.tokens[tenant], { query: 'SELECT id, tenant_id, value FROM k6_items WHERE id = $1', params: [id] });
  check(response, {
    'one row of its tenant': (r) => {
      const body = r.json();
      return body.rows.length === 1 && body.rows[0][0] === id && body.rows[0][1] === `t${tenant}`;
    },
  });
}
