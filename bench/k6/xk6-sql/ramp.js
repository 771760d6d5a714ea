// ramp.js over the PostgreSQL protocol: VUs ramp up and down, each VU a connection with its own token.
// ./k6 run -e JWT_SECRET=... -e PG_PORT=6432 bench/k6/xk6-sql/ramp.js
import { check } from 'k6';
import { open, rowOf, tenant } from './lib.js';

const PEAK = parseInt(__ENV.PEAK_VUS || '32', 10);
const STEP = __ENV.STEP || '10s';

export const options = {
  scenarios: {
    ramp: {
      executor: 'ramping-vus',
      startVUs: 1,
      stages: [
        { duration: STEP, target: Math.max(1, Math.floor(PEAK / 4)) },
        { duration: STEP, target: PEAK },
        { duration: STEP, target: PEAK },
        { duration: STEP, target: 0 },
      ],
      gracefulRampDown: '5s',
    },
  },
  thresholds: {
    iteration_duration: [`p(95)<${__ENV.P95_MS || '200'}`],
    checks: ['rate>0.99'],
  },
};

const db = open();

export function teardown() {
  db.close();
}

export default function () {
  const start = rowOf(tenant);
  const rows = db.query('SELECT count(*)::int4 AS n FROM k6_items WHERE id BETWEEN $1 AND $1 + 100', start);
  check(rows, { 'a count': (r) => r.length === 1 });
}
