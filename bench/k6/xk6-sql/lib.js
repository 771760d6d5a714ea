// Shared by the xk6-sql scripts (a k6 built with xk6-sql and its postgres driver): one database handle
// per VU, logged in as the JWT user with the VU's token as the password, over the PostgreSQL protocol.
import sql from 'k6/x/sql';
import driver from 'k6/x/sql/driver/postgres';
import { token, TENANTS } from '../lib.js';

export { rowOf, TENANTS } from '../lib.js';

const HOST = __ENV.PG_HOST || '127.0.0.1';
const PORT = __ENV.PG_PORT || '6432';
const USER = __ENV.PG_USER || 'api';
const DATABASE = __ENV.PG_DATABASE || 'app';

// init code runs once per VU: each VU is one tenant with its own connection pool and token
export const tenant = Math.max(0, __VU - 1) % TENANTS;

export function open() {
  const password = encodeURIComponent(token(tenant, `${__VU}`));
  return sql.open(driver, `postgres://${USER}:${password}@${HOST}:${PORT}/${DATABASE}?sslmode=disable`);
}
