// node-postgres (npm `pg`) smoke test: prepared statements, pipelined batches, COPY, cancel, LISTEN/NOTIFY.
// Reads DATABASE_URL; NODE_PATH must hold `pg` (and `pg-copy-streams` for COPY, skipped without it).
// Prints one `--- PASS|FAIL|SKIP: name (seconds)` line per check, as `go test -v` does, for tests/compat/run.py.
'use strict'

const { Client } = require('pg')
let copyStreams = null
try {
  copyStreams = require('pg-copy-streams')
} catch (error) {
  copyStreams = null
}

const url = process.env.DATABASE_URL
const CHECK_TIMEOUT_MS = 20000
// Per run, so targets sharing one database do not meet each other's tables.
const suffix = `${process.pid}_${Date.now()}`

function assertEqual(actual, expected, what) {
  const a = JSON.stringify(actual)
  const e = JSON.stringify(expected)
  if (a !== e) throw new Error(`${what}: expected ${e}, got ${a}`)
}

async function withClient(options, body) {
  const client = new Client({ connectionString: url, ...options })
  await client.connect()
  try {
    return await body(client)
  } finally {
    await client.end()
  }
}

class Skip extends Error {}

const checks = {
  async TestNodeSimpleQuery() {
    await withClient({}, async (client) => {
      const result = await client.query('select 1 as one; select 2 as two')
      assertEqual(result.map((r) => r.rows[0]), [{ one: 1 }, { two: 2 }], 'multi-statement simple query')
    })
  },

  async TestNodePreparedStatements() {
    await withClient({}, async (client) => {
      for (const n of [1, 41, -7]) {
        const result = await client.query({ name: 'add_one', text: 'select $1::int + 1 as n', values: [n] })
        assertEqual(result.rows, [{ n: n + 1 }], `named statement with ${n}`)
      }
      await client.query('begin')
      const inside = await client.query({ name: 'add_one', text: 'select $1::int + 1 as n', values: [9] })
      await client.query('commit')
      assertEqual(inside.rows, [{ n: 10 }], 'named statement inside a transaction')
      const unnamed = await client.query('select $1::text || $2::text as s', ['a', 'b'])
      assertEqual(unnamed.rows, [{ s: 'ab' }], 'unnamed statement')
    })
  },

  async TestNodeErrorRecovery() {
    await withClient({}, async (client) => {
      let code = null
      try {
        await client.query({ name: 'bad', text: 'select 1/$1::int as x', values: [0] })
      } catch (error) {
        code = error.code
      }
      assertEqual(code, '22012', 'division by zero SQLSTATE')
      const result = await client.query({ name: 'bad', text: 'select 1/$1::int as x', values: [1] })
      assertEqual(result.rows, [{ x: 1 }], 'the same statement after its error')
    })
  },

  async TestNodePipelinedBatch() {
    await withClient({ pipeline: true }, async (client) => {
      const table = `node_batch_${suffix}`
      await client.query(`create table ${table} (id int primary key, v text)`)
      try {
        const inserts = []
        for (let i = 0; i < 200; i++) {
          inserts.push(client.query(`insert into ${table} values ($1, $2)`, [i, `v${i}`]))
        }
        await Promise.all(inserts)
        const reads = []
        for (let i = 0; i < 50; i++) reads.push(client.query(`select v from ${table} where id = $1`, [i * 3]))
        const rows = (await Promise.all(reads)).map((r) => r.rows[0].v)
        assertEqual(rows, Array.from({ length: 50 }, (_, i) => `v${i * 3}`), 'pipelined reads')
        const duplicate = client.query(`insert into ${table} values (1, 'again')`).catch((error) => error.code)
        const after = client.query(`select count(*)::int as n from ${table}`)
        assertEqual(await duplicate, '23505', 'unique violation in a pipeline')
        assertEqual((await after).rows, [{ n: 200 }], 'count after the failed insert')
      } finally {
        await client.query(`drop table ${table}`)
      }
    })
  },

  async TestNodeCopy() {
    if (copyStreams === null) throw new Skip('pg-copy-streams not installed')
    const { pipeline } = require('stream/promises')
    const { Readable, Writable } = require('stream')
    await withClient({}, async (client) => {
      const table = `node_copy_${suffix}`
      await client.query(`create table ${table} (id int, v text)`)
      try {
        const lines = Array.from({ length: 5000 }, (_, i) => `${i}\trow ${i}\n`)
        await pipeline(Readable.from(lines), client.query(copyStreams.from(`copy ${table} from stdin`)))
        const count = await client.query(`select count(*)::int as n, sum(id)::bigint as s from ${table}`)
        assertEqual(count.rows, [{ n: 5000, s: String((4999 * 5000) / 2) }], 'rows after COPY FROM')
        let text = ''
        const sink = new Writable({
          write(chunk, _encoding, done) {
            text += chunk.toString()
            done()
          },
        })
        await pipeline(client.query(copyStreams.to(`copy (select id from ${table} order by id) to stdout`)), sink)
        const ids = text.trim().split('\n')
        assertEqual([ids.length, ids[0], ids[4999]], [5000, '0', '4999'], 'COPY TO lines')
      } finally {
        await client.query(`drop table ${table}`)
      }
    })
  },

  async TestNodeCancel() {
    await withClient({}, async (client) => {
      const started = Date.now()
      const sleeping = client.query('select pg_sleep(30)').catch((error) => error.code)
      await new Promise((resolve) => setTimeout(resolve, 500))
      new Client({ connectionString: url }).cancel(client, client.activeQuery)
      assertEqual(await sleeping, '57014', 'cancelled statement SQLSTATE')
      if (Date.now() - started > 10000) throw new Error('cancel took over 10 s')
      const result = await client.query('select 1 as n')
      assertEqual(result.rows, [{ n: 1 }], 'query after cancel')
    })
  },

  async TestNodeListenNotify() {
    await withClient({}, async (listener) => {
      const channel = `node_ch_${suffix}`
      const received = new Promise((resolve) => listener.on('notification', resolve))
      await listener.query(`listen ${channel}`)
      await withClient({}, async (notifier) => {
        await notifier.query('select pg_notify($1, $2)', [channel, 'hello'])
      })
      const note = await received
      assertEqual([note.channel, note.payload], [channel, 'hello'], 'notification')
    })
  },
}

function withTimeout(promise, name) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${name} timed out after ${CHECK_TIMEOUT_MS} ms`)), CHECK_TIMEOUT_MS)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

async function main() {
  let failed = 0
  for (const [name, check] of Object.entries(checks)) {
    const started = Date.now()
    console.log(`=== RUN   ${name}`)
    let outcome = 'PASS'
    try {
      await withTimeout(check(), name)
    } catch (error) {
      if (error instanceof Skip) {
        outcome = 'SKIP'
        console.log(`    ${error.message}`)
      } else {
        outcome = 'FAIL'
        failed += 1
        console.log(`    ${error && error.stack ? error.stack : error}`)
      }
    }
    console.log(`--- ${outcome}: ${name} (${((Date.now() - started) / 1000).toFixed(2)}s)`)
  }
  console.log(failed ? 'FAIL' : 'PASS')
  process.exit(failed ? 1 : 0)
}

main()
