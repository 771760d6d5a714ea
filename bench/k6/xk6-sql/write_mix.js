// write_mix.js over the PostgreSQL protocol: 80% reads, 10% updates, 10% two-statement transactions
// (one simple-protocol round trip: BEGIN; INSERT; UPDATE; COMMIT, with integer values inlined).
// ./k6 run -e JWT_SECRET=... -e PG_PORT=6432 bench/k6/xk6-sql/write_mix.js
import { group } from 'k6';
import { open, rowOf, tenant } from './lib.js';

export const options = {
  scenarios: {
    write_mix: { executor: 'constant-vus', vus: parseInt(__ENV.VUS || '8', 10), duration: __ENV.DURATION || '30s' },
  },
  thresholds: {
    'group_duration{group:::read}': [`p(95)<${__ENV.READ_P95_MS || '50'}`],
    'group_duration{group:::write}': [`p(95)<${__ENV.WRITE_P95_MS || '100'}`],
    'group_duration{group:::transaction}': [`p(95)<${__ENV.TRANSACTION_P95_MS || '150'}`],
  },
};

const db = open();

export function teardown() {
  db.close();
}

export default function () {
  const dice = Math.random();
  if (dice < 0.8) {
    group('read', () => db.query('SELECT value FROM k6_items WHERE id = $1', rowOf(tenant)));
  } else if (dice < 0.9) {
    group('write', () => db.exec('UPDATE k6_items SET value = value + 1 WHERE id = $1', rowOf(tenant)));
  } else {
    const item = rowOf(tenant);
    const other = rowOf(tenant);
    group('transaction', () => db.exec(
      `BEGIN; INSERT INTO k6_events (tenant_id, item_id) VALUES ('t${tenant}', ${item}); ` +
      `UPDATE k6_items SET value = value - 1 WHERE id = ${other}; COMMIT`));
  }
}
