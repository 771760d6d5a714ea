// A connection and token ramp: VUs (each its own keep-alive connection) ramp up and down; every VU signs
// a new token every TOKEN_EVERY iterations, so the proxy validates new tokens while the cache fills.
// k6 run -e JWT_SECRET=... bench/k6/ramp.js
import { check } from 'k6';
import { query, rowOf, token, TENANTS } from './lib.js';

const PEAK = parseInt(__ENV.PEAK_VUS || '32', 10);
const STEP = __ENV.STEP || '10s';
const TOKEN_EVERY = parseInt(__ENV.TOKEN_EVERY || '50', 10);

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
    http_req_failed: ['rate<0.01'],
    http_req_duration: [`p(95)<${__ENV.P95_MS || '200'}`],
    checks: ['rate>0.99'],
  },
};

let jwt = null;
let uses = 0;

export default function () {
  const tenant = (__VU - 1) % TENANTS;
  if (jwt === null || uses >= TOKEN_EVERY) {
    jwt = token(tenant, `${__VU}-${__ITER}`);
    uses = 0;
  }
  uses++;
  const response = query(jwt, { query: 'SELECT count(*)::int4 FROM k6_items WHERE id BETWEEN $1 AND $1 + 100', params: [rowOf(tenant)] });
  check(response, { 'a count': (r) => r.status === 200 && typeof r.json().rows[0][0] === 'number' });
}
