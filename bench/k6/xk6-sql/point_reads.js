// point_reads.js over the PostgreSQL protocol: k6 built with xk6-sql.
// ./k6 run -e JWT_SECRET=... -e PG_PORT=6432 bench/k6/xk6-sql/point_reads.js
import { check } from 'k6';
import { open, rowOf, tenant } from './lib.js';

export const options = {
  scenarios: {
    point_reads: { executor: 'constant-vus', vus: parseInt(__ENV.VUS || '8', 10), duration: __ENV.DURATION || '30s' },
  },
  thresholds: {
    iteration_duration: [`p(95)<${__ENV.P95_MS || '50'}`, `p(99)<${__ENV.P99_MS || '200'}`],
    checks: ['rate>0.99'],
  },
};

const db = open();

export function teardown() {
  db.close();
}

export default function () {
  const id = rowOf(tenant);
  const rows = db.query('SELECT id, tenant_id, value FROM k6_items WHERE id = $1', id);
  check(rows, { 'one row of its tenant': (r) => r.length === 1 && r[0].tenant_id === `t${tenant}` });
}
