'use strict'
// Flow control against peers that use the real @hyperswarm/rpc, on a local testnet: a
// slow reader holds HAIF's stream back (acks), strangers have a lane of their own, and
// silent connections past max_connections make room for new ones.

const { test, before, after } = require('node:test')
const assert = require('node:assert')
const path = require('path')
const { spawn } = require('child_process')
const { setupSidecar, createTestnet, peer, until, c } = require('./helpers')

const PEER_TOOL = path.join(__dirname, '..', 'tools', 'peer.js')
const json = { valueEncoding: c.json }

let testnet
let bootstrap
before(async () => {
  testnet = await createTestnet()
  bootstrap = testnet.bootstrap.map(({ host, port }) => `${host}:${port}`)
})
after(() => testnet.destroy())

function acked (haif, id) {
  return haif.frames.filter((f) => f.op === 'ack' && f.id === id).reduce((n, f) => n + f.chunks, 0)
}

test('a peer that stops reading a stream stops its acks: HAIF learns how far the peer got', async (t) => {
  const CHUNKS = 512
  const pad = 'x'.repeat(16 * 1024) // 8 MiB in all
  let streamId = null
  const handler = async ({ id }, haif) => {
    streamId = id
    haif.send({ op: 'chunk', id, value: { i: 0 } })
  }
  const { haif, key } = await setupSidecar(t, bootstrap, { handler })
  // A peer in a process of its own, so that it can be stopped (SIGSTOP: it reads nothing).
  const slow = spawn(process.execPath, [PEER_TOOL], { stdio: ['pipe', 'pipe', 'inherit'] })
  let out = ''
  slow.stdout.on('data', (d) => { out += d })
  const exited = new Promise((resolve) => slow.once('exit', resolve))
  t.after(() => { if (slow.exitCode === null) slow.kill('SIGKILL') })
  slow.stdin.end(JSON.stringify({
    bootstrap,
    server: key,
    calls: [{ method: 'haif.chat', value: { stream: true, haif: { request_id: 's-1' } }, timeout_ms: 60000 }]
  }))
  await until(() => streamId !== null && acked(haif, streamId) === 1, 20000, 'the first chunk acknowledged')
  slow.kill('SIGSTOP')
  for (let i = 1; i < CHUNKS; i++) haif.send({ op: 'chunk', id: streamId, value: { i, pad } })
  // What the transport takes before it pushes back is acknowledged; then nothing more.
  await until(() => acked(haif, streamId) > 1, 5000, 'what the transport takes acknowledged')
  await new Promise((resolve) => setTimeout(resolve, 1500))
  const whileStopped = acked(haif, streamId)
  assert.ok(whileStopped < CHUNKS / 4, `${whileStopped} of ${CHUNKS} chunks acknowledged while the peer read nothing`)
  slow.kill('SIGCONT')
  await until(() => acked(haif, streamId) === CHUNKS, 30000, 'every chunk acknowledged once the peer reads again')
  haif.send({ op: 'end', id: streamId })
  await exited
  const [result] = JSON.parse(out).results
  assert.deepStrictEqual(result.value, { object: 'haif.stream.end', id: 's-1', chunks: CHUNKS })
  assert.deepStrictEqual(result.chunks.map((chunk) => chunk.i), Array.from({ length: CHUNKS }, (_, i) => i))
})

test('strangers have a lane of their own: served peers keep their slots', async (t) => {
  const strangers = [] // link ids of strangers' requests HAIF is holding
  let goodKey = null
  const handler = async ({ id, peer: caller }, haif) => {
    if (caller === goodKey) haif.send({ op: 'respond', id, value: { ok: true } })
    else strangers.push(id) // answered by the test, UNAUTHORIZED
  }
  const { haif, key } = await setupSidecar(t, bootstrap, { handler, args: ['--max-concurrent', '4', '--max-unverified', '1'] })
  const good = peer(t, bootstrap, key)
  goodKey = good.keyPair.publicKey.toString('hex')
  assert.deepStrictEqual(await good.client.request('haif.models', {}, json), { ok: true }) // served once
  // Five strangers at once: one at HAIF, three waiting for its slot, the fifth refused
  // at once (no more strangers' requests held than max_concurrent) ...
  const outcomes = []
  const pending = Array.from({ length: 5 }, () => peer(t, bootstrap, key)).map((other) =>
    other.client.request('haif.models', {}, json).catch((e) => e).then((err) => { outcomes.push(err.cause.code); return err }))
  await until(() => strangers.length === 1 && outcomes.length === 1, 20000, 'one stranger at HAIF, one refused')
  assert.deepStrictEqual(outcomes, ['OVERLOADED'])
  // ... while the served peer still has all four of its slots.
  const answers = await Promise.all([1, 2, 3, 4].map(() => good.client.request('haif.models', {}, json)))
  assert.deepStrictEqual(answers, [1, 2, 3, 4].map(() => ({ ok: true })))
  assert.strictEqual(strangers.length, 1, 'one stranger at a time at HAIF')
  // Each refusal lets the next stranger through.
  for (let n = 1; n <= 4; n++) {
    await until(() => strangers.length === n, 10000, `stranger ${n} at HAIF`)
    haif.send({ op: 'respond', id: strangers[n - 1], error: { code: 'UNAUTHORIZED', message: 'who are you' } })
  }
  await Promise.all(pending)
  assert.deepStrictEqual(outcomes, ['OVERLOADED', 'UNAUTHORIZED', 'UNAUTHORIZED', 'UNAUTHORIZED', 'UNAUTHORIZED'])
})

test('past max_connections an idle connection makes room for a new one', async (t) => {
  const { key } = await setupSidecar(t, bootstrap, { args: ['--max-connections', '2'] })
  const idle = []
  for (let i = 0; i < 3; i++) {
    const p = peer(t, bootstrap, key)
    await p.client.rpc.fullyOpened()
    idle.push(p)
  }
  await until(() => idle.filter((p) => p.client.closed).length >= 1, 10000, 'an idle connection closed')
  const late = peer(t, bootstrap, key)
  const answer = await late.client.request('haif.models', { late: true }, json)
  assert.deepStrictEqual(answer.value, { late: true })
})
