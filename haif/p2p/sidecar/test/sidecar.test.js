'use strict'
// The sidecar against peers that use the real @hyperswarm/rpc, on a local testnet.

const { test, before, after } = require('node:test')
const assert = require('node:assert')
const fs = require('fs')
const path = require('path')
const { FakeHaif, echoHandler, startSidecar, createTestnet, node, peer, tmpdir, until, c } = require('./helpers')

let testnet
let bootstrap
before(async () => {
  testnet = await createTestnet()
  bootstrap = testnet.bootstrap.map(({ host, port }) => `${host}:${port}`)
})
after(() => testnet.destroy())

async function setup (t, { args = [], handler = echoHandler } = {}) {
  const dir = tmpdir()
  const haif = new FakeHaif(dir, handler)
  await haif.listen()
  const child = await startSidecar({ dir, haif, bootstrap, args })
  t.after(async () => {
    child.kill('SIGKILL')
    await child.exited
    await haif.close()
    fs.rmSync(dir, { recursive: true, force: true })
  })
  return { dir, haif, child, key: haif.ready.public_key }
}

const json = { valueEncoding: c.json }

test('a request reaches HAIF with the caller\'s key, and the answer comes back', async (t) => {
  const { haif, key } = await setup(t)
  const { client, keyPair } = peer(t, bootstrap, key)
  const answer = await client.request('haif.models', { hello: 'world' }, json)
  assert.deepStrictEqual(answer, { method: 'haif.models', peer: keyPair.publicKey.toString('hex'), value: { hello: 'world' } })
  await until(() => haif.peers && haif.peers.inbound === 1, 5000, 'the peer count')
})

test('a stream arrives as haif.stream.chunk events, then the end', async (t) => {
  const { key } = await setup(t)
  const { client, events } = peer(t, bootstrap, key)
  const end = await client.request('haif.chat', { stream: true, haif: { request_id: 'req-1' } }, json)
  assert.deepStrictEqual(end, { object: 'haif.stream.end', id: 'req-1', chunks: 3 })
  assert.deepStrictEqual(events, [0, 1, 2].map((index) => ({ id: 'req-1', chunk: { index, method: 'haif.chat' } })))
})

test('HAIF errors reach the caller as cause.code, message and context', async (t) => {
  const { key } = await setup(t)
  const { client } = peer(t, bootstrap, key)
  const err = await client.request('haif.chat', { fail: 'RATE_LIMITED' }, json).catch((e) => e)
  assert.strictEqual(err.code, 'REQUEST_ERROR')
  assert.strictEqual(err.cause.code, 'RATE_LIMITED')
  assert.strictEqual(err.cause.message, 'failed: RATE_LIMITED')
  assert.deepStrictEqual(JSON.parse(err.cause.context), { status: 429, retry_after_s: 2 })
})

test('malformed, oversize and non-object values and unknown methods are typed errors; the sidecar keeps serving', async (t) => {
  const { key, child } = await setup(t, { args: ['--max-message-bytes', '1024'] })
  const { client } = peer(t, bootstrap, key)
  const raw = { valueEncoding: c.raw }
  const bad = [
    client.request('haif.chat', Buffer.from('05ffff7b7b', 'hex'), raw), // invalid UTF-8, not JSON
    client.request('haif.chat', Buffer.from('057b6f6f7073', 'hex'), raw), // "{oops": a SyntaxError inside
    client.request('haif.chat', Buffer.alloc(0), raw), // nothing at all
    client.request('haif.chat', Buffer.from([0xff, 0xff, 0xff]), raw), // a length past the end
    client.request('haif.chat', [1, 2, 3], json), // JSON, not an object
    client.request('haif.chat', { pad: 'x'.repeat(2048) }, json) // oversize
  ]
  for (const outcome of await Promise.allSettled(bad)) {
    assert.strictEqual(outcome.status, 'rejected')
    assert.strictEqual(outcome.reason.code, 'REQUEST_ERROR')
    assert.strictEqual(outcome.reason.cause.code, 'INVALID_REQUEST', outcome.reason.cause.message)
  }
  const unknown = await client.request('haif.nope', {}, json).catch((e) => e)
  assert.strictEqual(unknown.code, 'UNKNOWN_METHOD')
  assert.deepStrictEqual((await client.request('haif.models', { ok: 1 }, json)).value, { ok: 1 })
  assert.strictEqual(child.exitCode, null)
})

test('odd answers from HAIF become plain errors or null, never a crash', async (t) => {
  const handler = async ({ id, value }, haif) => {
    if (value.kind === 'bad-error') haif.send({ op: 'respond', id, error: { code: 42, message: { no: 1 }, context: 7 } })
    else if (value.kind === 'lowercase-code') haif.send({ op: 'respond', id, error: { code: 'rate limited!', message: 'x' } })
    else if (value.kind === 'no-value') haif.send({ op: 'respond', id })
    else if (value.kind === 'error-not-object') haif.send({ op: 'respond', id, error: 'boom' })
    else haif.send({ op: 'respond', id, value: 'fine' })
  }
  const { key, child } = await setup(t, { handler })
  const { client } = peer(t, bootstrap, key)
  for (const kind of ['bad-error', 'lowercase-code', 'error-not-object']) {
    const err = await client.request('haif.chat', { kind }, json).catch((e) => e)
    assert.strictEqual(err.cause.code, 'INTERNAL', kind)
  }
  assert.strictEqual(await client.request('haif.chat', { kind: 'no-value' }, json), null)
  assert.strictEqual(await client.request('haif.chat', {}, json), 'fine')
  assert.strictEqual(child.exitCode, null)
})

test('a request HAIF does not answer in time is TIMEOUT, and HAIF is told to cancel it', async (t) => {
  const { key, haif } = await setup(t, { args: ['--request-timeout-ms', '300'] })
  const { client } = peer(t, bootstrap, key)
  const err = await client.request('haif.chat', { hang: true }, json).catch((e) => e)
  assert.strictEqual(err.cause.code, 'TIMEOUT')
  await until(() => haif.cancelled.length === 1, 2000, 'the cancel frame')
  const quick = await client.request('haif.chat', { hang: true, haif: { timeout_s: 0.05 } }, json).catch((e) => e)
  assert.strictEqual(quick.cause.code, 'TIMEOUT')
  assert.match(quick.cause.message, /50 ms/)
})

test('more requests than max_concurrent are OVERLOADED', async (t) => {
  const { key } = await setup(t, { args: ['--max-concurrent', '2', '--request-timeout-ms', '800'] })
  const { client } = peer(t, bootstrap, key)
  const outcomes = await Promise.allSettled([1, 2, 3].map(() => client.request('haif.chat', { hang: true }, json)))
  const codes = outcomes.map((o) => o.reason.cause.code).sort()
  assert.deepStrictEqual(codes, ['OVERLOADED', 'TIMEOUT', 'TIMEOUT'])
})

test('outbound calls reach a remote peer, stream its chunks and carry its errors', async (t) => {
  const { haif } = await setup(t)
  const remote = node(t, bootstrap)
  const server = remote.rpc.createServer()
  server.respond('haif.worker.health', json, () => ({ ok: true }))
  server.respond('haif.worker.infer', { valueEncoding: c.raw }, (raw, conn) => {
    const value = c.decode(c.json, raw)
    if (value.fail) {
      const err = new Error('no such model')
      err.code = 'MODEL_NOT_FOUND'
      throw err
    }
    for (let i = 0; i < 2; i++) conn.event('haif.stream.chunk', c.encode(c.json, { id: value.haif.request_id, chunk: i }), { valueEncoding: c.raw })
    return c.encode(c.json, { done: true })
  })
  await server.listen()
  const key = server.publicKey.toString('hex')
  const health = await haif.call({ id: 1, peer: key, method: 'haif.worker.health', value: {} })
  assert.deepStrictEqual(health.value, { ok: true }, JSON.stringify(health.error))
  const streamed = await haif.call({ id: 2, peer: key, method: 'haif.worker.infer', value: { haif: { request_id: 'w-1' } } })
  assert.deepStrictEqual(streamed.value, { done: true })
  const chunks = haif.frames.filter((f) => f.op === 'chunk' && f.id === 2).map((f) => f.value)
  assert.deepStrictEqual(chunks, [0, 1])
  const failed = await haif.call({ id: 3, peer: key, method: 'haif.worker.infer', value: { fail: true } })
  assert.deepStrictEqual(failed.error.code, 'MODEL_NOT_FOUND')
  const unknown = await haif.call({ id: 4, peer: key, method: 'haif.worker.nope', value: {} })
  assert.strictEqual(unknown.error.code, 'UNKNOWN_METHOD')
  const bad = await haif.call({ id: 5, peer: 'zz', method: 'haif.worker.health', value: {} })
  assert.strictEqual(bad.error.code, 'INVALID_REQUEST')
  const gone = await haif.call({ id: 6, peer: 'ab'.repeat(32), method: 'haif.worker.health', value: {}, timeout_ms: 500 })
  assert.ok(['TIMEOUT', 'UNAVAILABLE'].includes(gone.error.code), gone.error.code)
})

test('the key comes from the seed file: the same after a restart', async (t) => {
  const dir = tmpdir()
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }))
  const keys = []
  for (let i = 0; i < 2; i++) {
    const haif = new FakeHaif(dir, echoHandler)
    await haif.listen()
    const child = await startSidecar({ dir, haif, bootstrap })
    keys.push(haif.ready.public_key)
    await haif.close() // the link closes: the sidecar exits by itself
    assert.deepStrictEqual(await child.exited, { code: 0, signal: null })
  }
  assert.strictEqual(keys[0], keys[1])
  assert.strictEqual(fs.statSync(path.join(dir, 'seed')).size, 32)
})
