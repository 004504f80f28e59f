#!/usr/bin/env node
'use strict'
// A P2P peer for tests and by hand: calls methods of a HAIF shim with the real
// @hyperswarm/rpc, the way any peer would. Reads one JSON object on stdin:
//
//   {"bootstrap": ["127.0.0.1:PORT"] | null, "server": "<hex public key>",
//    "seed": "<64 hex, optional: this peer's key seed>",
//    "calls": [{"method": "haif.chat", "value": {...}, "timeout_ms": 10000},
//              {"method": "haif.chat", "raw_hex": "05ff00"},       (bytes sent as they are)
//              {"method": "haif.chat", "value": {..., "stream": true}}]}
//
// and prints one JSON object: {"public_key": "<this peer's key>", "results": [...]},
// each result {"value": ..., "chunks": [...]} or {"error": {"code", "message",
// "cause": {"code", "message", "context"} | null}, "chunks": [...]}. Calls run in order,
// on one connection; chunks are the haif.stream.chunk events that named the call's
// haif.request_id (or, without one, every chunk that arrived during the call).

const DHT = require('hyperdht')
const RPC = require('@hyperswarm/rpc')
const c = require('compact-encoding')

async function readStdin () {
  const parts = []
  for await (const part of process.stdin) parts.push(part)
  return JSON.parse(Buffer.concat(parts).toString('utf8'))
}

async function main () {
  const spec = await readStdin()
  const keyPair = spec.seed ? DHT.keyPair(Buffer.from(spec.seed, 'hex')) : DHT.keyPair()
  const bootstrap = spec.bootstrap || undefined
  const dht = new DHT({ keyPair, bootstrap, host: bootstrap ? '127.0.0.1' : undefined })
  const rpc = new RPC({ dht, keyPair })
  const client = rpc.connect(Buffer.from(spec.server, 'hex'))
  let current = null
  client.rpc.respond('haif.stream.chunk', { valueEncoding: c.json }, (event) => {
    if (current && (current.id === null || event.id === current.id)) current.chunks.push(event.chunk)
    return null
  })
  const results = []
  for (const call of spec.calls) {
    const requestId = call.value && call.value.haif && call.value.haif.request_id
    current = { id: requestId || null, chunks: [] }
    const options = { timeout: call.timeout_ms || 30000 }
    try {
      const value = call.raw_hex !== undefined
        ? c.decode(c.json, await client.request(call.method, Buffer.from(call.raw_hex, 'hex'), { ...options, valueEncoding: c.raw }))
        : await client.request(call.method, call.value, { ...options, valueEncoding: c.json })
      results.push({ value, chunks: current.chunks })
    } catch (err) {
      const cause = err.cause
        ? { code: err.cause.code || null, message: err.cause.message, context: err.cause.context || null }
        : null
      results.push({ error: { code: err.code || null, message: err.message, cause }, chunks: current.chunks })
    }
  }
  process.stdout.write(JSON.stringify({ public_key: keyPair.publicKey.toString('hex'), results }) + '\n')
  await rpc.destroy({ force: true })
  await dht.destroy({ force: true })
}

main().catch((err) => {
  process.stderr.write(`peer: ${err.stack || err}\n`)
  process.exit(1)
})
