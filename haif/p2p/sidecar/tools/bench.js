#!/usr/bin/env node
'use strict'
// A benchmark peer with the real @hyperswarm/rpc (bench/p2p.py drives it). One JSON
// object per line on stdin, one JSON answer per line on stdout:
//
//   {"op": "init", "bootstrap": [...] | null, "seed": "<64 hex>"}          -> {"public_key"}
//   {"op": "run", "server": "<hex>", "method", "value", "requests": N, "concurrency": C,
//    "stream": false, "timeout_ms": 30000}
//        -> {"latencies_ms": [...], "first_chunk_ms": [...], "chunks": n, "elapsed_ms", "errors": {code: n}}
//   {"op": "serve"}   a bare @hyperswarm/rpc server, the transport's floor: `echo` answers
//                     its value; `echo.stream` ({"chunks": n, "chunk": any, "haif":
//                     {"request_id"}}) sends n haif.stream.chunk events, then answers as
//                     HAIF's shim ends a stream                               -> {"public_key"}
//
// Requests of a run share one connection (a peer's way: protomux multiplexes them),
// C in flight at a time; a streamed request's latency is to its end, after its chunks.

const readline = require('readline')
const DHT = require('hyperdht')
const RPC = require('@hyperswarm/rpc')
const c = require('compact-encoding')

const json = { valueEncoding: c.json }
let dht = null
let rpc = null
const clients = new Map() // server hex -> {client, streams: Map(stream id -> state)}
let nextStream = 1

function init ({ bootstrap, seed }) {
  const keyPair = seed ? DHT.keyPair(Buffer.from(seed, 'hex')) : DHT.keyPair()
  dht = new DHT({ keyPair, bootstrap: bootstrap || undefined, host: bootstrap ? '127.0.0.1' : undefined })
  rpc = new RPC({ dht, keyPair })
  return { public_key: keyPair.publicKey.toString('hex') }
}

function connection (server) {
  let entry = clients.get(server)
  if (entry && !entry.client.closed) return entry
  const client = rpc.connect(Buffer.from(server, 'hex'))
  entry = { client, streams: new Map() }
  const streams = entry.streams
  client.rpc.respond('haif.stream.chunk', json, (event) => {
    const state = event && streams.get(event.id)
    if (state) {
      if (state.chunks === 0) state.first = performance.now()
      state.chunks++
    }
    return null
  })
  clients.set(server, entry)
  return entry
}

async function run (spec) {
  const { client, streams } = connection(spec.server)
  const latencies = []
  const firsts = []
  const errors = {}
  let chunks = 0
  let left = spec.requests
  async function one () {
    let value = spec.value
    let state = null
    if (spec.stream) {
      const id = `b-${process.pid}-${nextStream++}`
      value = { ...value, haif: { ...(value.haif || {}), request_id: id } }
      state = { chunks: 0, first: 0 }
      streams.set(id, state)
    }
    const started = performance.now()
    try {
      await client.request(spec.method, value, { ...json, timeout: spec.timeout_ms || 30000 })
      latencies.push(performance.now() - started)
      if (state) {
        chunks += state.chunks
        if (state.chunks) firsts.push(state.first - started)
      }
    } catch (err) {
      const code = (err.cause && err.cause.code) || err.code || 'ERROR'
      errors[code] = (errors[code] || 0) + 1
    } finally {
      if (state) streams.delete(value.haif.request_id)
    }
  }
  async function lane () {
    while (left > 0) {
      left--
      await one()
    }
  }
  const started = performance.now()
  await Promise.all(Array.from({ length: Math.max(1, Math.min(spec.concurrency || 1, spec.requests)) }, lane))
  return { latencies_ms: latencies, first_chunk_ms: firsts, chunks, elapsed_ms: performance.now() - started, errors }
}

async function serve () {
  const server = rpc.createServer()
  server.respond('echo', json, (value) => value)
  server.respond('echo.stream', json, (value, conn) => {
    const id = value.haif.request_id
    for (let i = 0; i < value.chunks; i++) conn.event('haif.stream.chunk', { id, chunk: value.chunk }, json)
    return { object: 'haif.stream.end', id, chunks: value.chunks }
  })
  await server.listen()
  return { public_key: server.publicKey.toString('hex') }
}

async function main () {
  const lines = readline.createInterface({ input: process.stdin })
  for await (const line of lines) {
    if (!line.trim()) continue
    const command = JSON.parse(line)
    let answer
    if (command.op === 'init') answer = init(command)
    else if (command.op === 'run') answer = await run(command)
    else if (command.op === 'serve') answer = await serve()
    else answer = { error: `unknown op ${command.op}` }
    process.stdout.write(JSON.stringify(answer) + '\n')
  }
  if (rpc) await rpc.destroy({ force: true })
  if (dht) await dht.destroy({ force: true })
}

main().catch((err) => {
  process.stderr.write(`bench: ${err.stack || err}\n`)
  process.exit(1)
})
