#!/usr/bin/env node
'use strict'
// HAIF's P2P sidecar: the real @hyperswarm/rpc on hyperdht, bridged to HAIF's Python
// side over a Unix socket. Python (haif/p2p/sidecar.py) starts it, supervises it and
// restarts it; the frame protocol is described in README.md next to this file.
//
//   node sidecar.js --socket PATH --seed-file PATH [--bootstrap HOST:PORT ...] [--host H]
//                   [--method NAME ...] [--max-message-bytes N] [--max-frame-bytes N]
//                   [--max-concurrent N] [--max-unverified N] [--max-connections N]
//                   [--request-timeout-ms N]
//
// No --bootstrap: HAIF_P2P__BOOTSTRAP (a JSON list), else the public DHT. No --host:
// 127.0.0.1 when every bootstrap node is on the loopback (a local testnet: peers there
// must bind it, 0.0.0.0 opens streams that then time out), else 0.0.0.0.
// The link token is read from HAIF_P2P_SIDECAR_TOKEN.

const { parseArgs } = require('util')
const DHT = require('hyperdht')
const RPC = require('@hyperswarm/rpc')
const { PythonLink } = require('./lib/link')
const { Inbound } = require('./lib/inbound')
const { Outbound } = require('./lib/outbound')
const { loadOrCreateSeed } = require('./lib/seed')

const INBOUND_METHODS = ['haif.models', 'haif.completions', 'haif.chat', 'haif.embeddings']
const SHUTDOWN_GRACE_MS = 2000

function options (argv, env) {
  const { values } = parseArgs({
    args: argv,
    options: {
      socket: { type: 'string' },
      'seed-file': { type: 'string' },
      bootstrap: { type: 'string', multiple: true },
      host: { type: 'string' },
      method: { type: 'string', multiple: true },
      'max-message-bytes': { type: 'string', default: String(4 * 1024 * 1024) },
      'max-frame-bytes': { type: 'string' },
      'max-concurrent': { type: 'string', default: '256' },
      'max-unverified': { type: 'string', default: '32' },
      'max-connections': { type: 'string', default: '1024' },
      'request-timeout-ms': { type: 'string', default: '120000' }
    }
  })
  if (!values.socket || !values['seed-file']) throw new Error('--socket and --seed-file are required')
  let bootstrap = values.bootstrap
  if (!bootstrap && env.HAIF_P2P__BOOTSTRAP) bootstrap = JSON.parse(env.HAIF_P2P__BOOTSTRAP)
  if (bootstrap && (!Array.isArray(bootstrap) || !bootstrap.every((b) => /^[^:\s]+:\d{1,5}$/.test(b)))) {
    throw new Error('bootstrap nodes are HOST:PORT')
  }
  const maxMessageBytes = positive(values['max-message-bytes'], 'max-message-bytes')
  return {
    socket: values.socket,
    seedFile: values['seed-file'],
    bootstrap: bootstrap && bootstrap.length ? bootstrap : undefined,
    host: values.host || defaultHost(bootstrap),
    methods: values.method || INBOUND_METHODS,
    maxMessageBytes,
    maxFrameBytes: values['max-frame-bytes'] ? positive(values['max-frame-bytes'], 'max-frame-bytes') : 2 * maxMessageBytes + 65536,
    maxConcurrent: positive(values['max-concurrent'], 'max-concurrent'),
    maxUnverified: positive(values['max-unverified'], 'max-unverified'),
    maxConnections: positive(values['max-connections'], 'max-connections'),
    requestTimeoutMs: positive(values['request-timeout-ms'], 'request-timeout-ms'),
    token: env.HAIF_P2P_SIDECAR_TOKEN || ''
  }
}

function isLoopback (host) {
  return /^(127\.\d+\.\d+\.\d+|localhost)$/.test(host)
}

function defaultHost (bootstrap) {
  const loopback = (b) => isLoopback(b.slice(0, b.lastIndexOf(':')))
  return bootstrap && bootstrap.length && bootstrap.every(loopback) ? '127.0.0.1' : '0.0.0.0'
}

function positive (text, name) {
  const n = Number(text)
  if (!Number.isSafeInteger(n) || n < 1) throw new Error(`--${name} must be a positive integer`)
  return n
}

function log (message) {
  process.stderr.write(`haif-p2p[${process.pid}]: ${message}\n`)
}

async function main () {
  const opts = options(process.argv.slice(2), process.env)
  const link = new PythonLink({ socketPath: opts.socket, token: opts.token, maxFrameBytes: opts.maxFrameBytes, log })
  await link.connect()

  const keyPair = DHT.keyPair(loadOrCreateSeed(opts.seedFile))
  // A node bound to the loopback talks only to peers on this machine, which can always
  // reach it: it is never behind a NAT. Saying so up front skips hyperdht's firewall
  // probe, whose quick heuristic races the bootstrap and, when it loses, leaves two
  // loopback nodes to holepunch each other (HOLEPUNCH_ABORTED now and then).
  const firewalled = !isLoopback(opts.host)
  const dht = new DHT({ keyPair, bootstrap: opts.bootstrap, host: opts.host, firewalled })
  const rpc = new RPC({ dht, keyPair })
  const server = rpc.createServer()
  const limits = {
    link,
    maxMessageBytes: opts.maxMessageBytes,
    maxConcurrent: opts.maxConcurrent,
    requestTimeoutMs: opts.requestTimeoutMs,
    log
  }
  const inbound = new Inbound({ ...limits, maxUnverified: opts.maxUnverified })
  const outbound = new Outbound({ ...limits, rpc, maxConnections: opts.maxConnections, onchange: report })
  inbound.register(server, opts.methods)

  let reporting = false
  function report () {
    if (reporting) return
    reporting = true
    setImmediate(() => {
      reporting = false
      link.send({ op: 'peers', inbound: server.connections.size, outbound: outbound.connections })
    })
  }

  server.on('connection', (conn) => {
    inbound.attach(conn)
    // Past the limit an idle connection makes room (a stranger's first): a flood of
    // silent connections cannot lock peers out.
    if (server.connections.size > opts.maxConnections && !inbound.evictFor(conn)) {
      conn.destroy()
      return
    }
    conn.on('close', report)
    report()
  })
  link.on('call', (frame) => { outbound.call(frame) })
  link.on('cancel', (id) => outbound.cancel(id))

  let closing = false
  async function shutdown (code) {
    if (closing) return
    closing = true
    const timer = setTimeout(() => process.exit(code), SHUTDOWN_GRACE_MS)
    try {
      outbound.destroy()
      await rpc.destroy({ force: true })
      await dht.destroy({ force: true })
    } finally {
      clearTimeout(timer)
      process.exit(code)
    }
  }
  link.on('close', () => shutdown(0))
  process.once('SIGTERM', () => shutdown(0))
  process.once('SIGINT', () => shutdown(0))

  await server.listen(keyPair)
  link.send({
    op: 'ready',
    public_key: keyPair.publicKey.toString('hex'),
    host: opts.host,
    bootstrap: opts.bootstrap || null,
    methods: opts.methods
  })
  log(`listening as ${keyPair.publicKey.toString('hex')} (${opts.bootstrap ? opts.bootstrap.join(',') : 'public DHT'}, host ${opts.host})`)
}

process.on('unhandledRejection', (err) => {
  log(`unhandled rejection: ${err && err.stack ? err.stack : err}`)
  process.exit(1)
})

main().catch((err) => {
  log(`cannot start: ${err && err.message ? err.message : err}`)
  process.exit(1)
})
