// The postgres.js reference for bench/run: `sql.subscribe('*', fn)`, which
// decodes pgoutput into row objects and publishes nowhere.
//
// postgres.js always makes its own TEMPORARY slot at the current WAL
// position; to drain the copy of the workload's slot instead, the two
// replication commands it sends are redirected (CREATE_REPLICATION_SLOT
// becomes a lookup of our slot's position, START_REPLICATION names our
// slot). Its decoding path is untouched.
//
// Environment: BENCH_PG_PORT, BENCH_PG_DATABASE, BENCH_SLOT,
// BENCH_PUBLICATION, BENCH_EXPECTED (changes to wait for),
// BENCH_STALL_SECONDS (give up when nothing arrives for that long).
// Prints one JSON line: {"changes", "seconds", "cpu_seconds", "peak_rss"
// (VmHWM, bytes: node's own maxRSS would count bench/run's image from
// before exec)}; exits 1 on a stall or an error.

import { readFileSync } from 'node:fs'
import { performance } from 'node:perf_hooks'
import postgres from 'postgres'

const env = process.env
const slot = env.BENCH_SLOT
const expected = Number(env.BENCH_EXPECTED)
const stallSeconds = Number(env.BENCH_STALL_SECONDS || 60)

if (!/^[a-z0-9_]+$/.test(slot || '') || !(expected > 0)) {
  fail('BENCH_SLOT and BENCH_EXPECTED must be set')
}

const sql = postgres({
  host: '127.0.0.1',
  port: Number(env.BENCH_PG_PORT),
  user: 'postgres',
  database: env.BENCH_PG_DATABASE,
  publications: env.BENCH_PUBLICATION,
  onnotice: () => {}
})

const replication = sql.subscribe.sql
const unsafe = replication.unsafe
replication.unsafe = function (query, ...rest) {
  if (query.startsWith('CREATE_REPLICATION_SLOT ')) {
    query = 'SELECT confirmed_flush_lsn::text AS consistent_point ' +
      `FROM pg_replication_slots WHERE slot_name = '${slot}'`
  } else if (query.startsWith('START_REPLICATION SLOT ')) {
    query = query.replace(/^START_REPLICATION SLOT \S+/, `START_REPLICATION SLOT ${slot}`)
  }
  return unsafe.call(this, query, ...rest)
}

let changes = 0
let lastChange = performance.now()
const cpu0 = process.cpuUsage()
const t0 = performance.now()

function finish () {
  const seconds = (performance.now() - t0) / 1000
  const cpu = process.cpuUsage(cpu0)
  console.log(JSON.stringify({ changes, seconds, cpu_seconds: (cpu.user + cpu.system) / 1e6, peak_rss: peakRss() }))
  process.exit(0)
}

function peakRss () {
  const line = readFileSync('/proc/self/status', 'utf8').split('\n').find(l => l.startsWith('VmHWM:'))
  return line ? Number(line.split(/\s+/)[1]) * 1024 : 0
}

function fail (error) {
  console.log(JSON.stringify({ changes, error: String(error) }))
  process.exit(1)
}

process.on('unhandledRejection', fail)
process.on('uncaughtException', fail)

setInterval(() => {
  if (performance.now() - lastChange > stallSeconds * 1000) {
    fail(`no change for ${stallSeconds}s after ${changes} of ${expected}`)
  }
}, 1000)

await sql.subscribe(
  '*',
  () => {
    lastChange = performance.now()
    if (++changes === expected) finish()
  },
  () => {},
  fail
)
