#!/usr/bin/env node
'use strict'
// Many peers at once against a HAIF shim, for tests and benchmarks, with the real
// @hyperswarm/rpc: each connection has a key pair of its own (a stranger unless the
// seed is mapped to a tenant). Reads one JSON object on stdin:
//
//   {"bootstrap": ["127.0.0.1:PORT"] | null, "server": "<hex public key>",
//    "connections": 1000,          how many connections, one after another per lane
//    "concurrency": 32,            lanes: connections open at once
//    "mode": "request" | "garbage" | "idle",
//    "calls": [{"method", "value", "timeout_ms"}],   mode request: made on each connection
//    "seed": "<64 hex>",           optional: every connection uses this key (else a new one each)
//    "hold_ms": 2000}              mode idle: how long each connection stays open, silent
//
// Modes: `request` opens the RPC channel, then makes the calls on it, in order; `garbage`
// opens the Noise stream and writes random bytes (not protomux frames) into it; `idle`
// opens a connection and says nothing. Prints one JSON object: {"outcomes": {<what>:
// count}, "latencies_ms": [...], "connect_ms": [...], "elapsed_ms"}, an outcome being
// `ok`, the error's `cause.code`, else its `code` (e.g. CHANNEL_CLOSED), CONNECT_FAILED,
// or, for raw connections, `closed_by_shim`, `left_open` (garbage) or `held` (idle);
// latencies are the requests' (ms), connects the RPC channels' opening (ms).

const crypto = require('crypto')
const DHT = require('hyperdht')
const RPC = require('@hyperswarm/rpc')
const c = require('compact-encoding')

async function readStdin () {
  const parts = []
  for await (const part of process.stdin) parts.push(part)
  return JSON.parse(Buffer.concat(parts).toString('utf8'))
}

function outcomeOf (err) {
  if (err.cause && err.cause.code) return err.cause.code
  return err.code || 'ERROR'
}

async function main () {
  const spec = await readStdin()
  const bootstrap = spec.bootstrap || undefined
  const server = Buffer.from(spec.server, 'hex')
  const dht = new DHT({ bootstrap, host: bootstrap ? '127.0.0.1' : undefined })
  const rpc = new RPC({ dht })
  const outcomes = {}
  const latencies = []
  const connects = []
  const count = (what) => { outcomes[what] = (outcomes[what] || 0) + 1 }
  const keyPair = () => spec.seed ? DHT.keyPair(Buffer.from(spec.seed, 'hex')) : DHT.keyPair()

  async function request () {
    const client = rpc.connect(server, { keyPair: keyPair() })
    try {
      const opening = performance.now()
      await client.rpc.fullyOpened()
      if (client.closed) {
        count('CONNECT_FAILED')
        return
      }
      connects.push(performance.now() - opening)
      for (const call of spec.calls || [{ method: 'haif.models', value: {} }]) {
        const started = performance.now()
        try {
          await client.request(call.method, call.value, { valueEncoding: c.json, timeout: call.timeout_ms || 30000 })
          count('ok')
        } catch (err) {
          count(outcomeOf(err))
        }
        latencies.push(performance.now() - started)
      }
    } finally {
      client.destroy()
    }
  }

  async function raw (write) {
    const stream = dht.connect(server, { keyPair: keyPair() })
    stream.on('error', () => {})
    const closed = new Promise((resolve) => stream.once('close', resolve))
    try {
      await stream.opened
    } catch {
      count('CONNECT_FAILED')
      return
    }
    if (write) {
      stream.write(crypto.randomBytes(512))
      // The shim must hang up on garbage; give it a moment, then hang up ourselves.
      const hung = await Promise.race([closed.then(() => true), sleep(spec.hold_ms || 2000).then(() => false)])
      count(hung ? 'closed_by_shim' : 'left_open')
    } else {
      await Promise.race([closed, sleep(spec.hold_ms || 2000)])
      count(stream.destroyed ? 'closed_by_shim' : 'held')
    }
    stream.destroy()
  }

  const one = spec.mode === 'garbage' ? () => raw(true) : spec.mode === 'idle' ? () => raw(false) : request
  let next = 0
  const total = spec.connections || 1
  async function lane () {
    while (next < total) {
      next++
      await one()
    }
  }
  const started = performance.now()
  await Promise.all(Array.from({ length: Math.min(spec.concurrency || 1, total) }, lane))
  const elapsedMs = performance.now() - started
  process.stdout.write(JSON.stringify({ outcomes, latencies_ms: latencies, connect_ms: connects, elapsed_ms: elapsedMs }) + '\n')
  await rpc.destroy({ force: true })
  await dht.destroy({ force: true })
}

function sleep (ms) {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

main().catch((err) => {
  process.stderr.write(`flood: ${err.stack || err}\n`)
  process.exit(1)
})
