'use strict'
// Test fixtures: a local testnet, a stand-in for HAIF's Python side on the link, the
// sidecar as a child process, and peers that use the real @hyperswarm/rpc.

const fs = require('fs')
const os = require('os')
const net = require('net')
const path = require('path')
const { spawn } = require('child_process')
const DHT = require('hyperdht')
const RPC = require('@hyperswarm/rpc')
const c = require('compact-encoding')
const createTestnet = require('@hyperswarm/testnet')
const { FrameDecoder, encodeFrame } = require('../lib/frames')

const SIDECAR = path.join(__dirname, '..', 'sidecar.js')
const FRAME_BYTES = 16 * 1024 * 1024

function tmpdir () {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'haif-p2p-test-'))
}

async function until (predicate, timeoutMs = 10000, what = 'condition') {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    const value = await predicate()
    if (value) return value
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  throw new Error(`timed out waiting for ${what}`)
}

/** Plays HAIF's Python side: accepts the sidecar's link and answers requests with `handler`. */
class FakeHaif {
  constructor (dir, handler) {
    this.socketPath = path.join(dir, 'link.sock')
    this.token = 'test-token'
    this.handler = handler
    this.frames = [] // every frame from the sidecar
    this.ready = null
    this.peers = null
    this.cancelled = []
    this.results = new Map()
    this.socket = null
    this.server = net.createServer((socket) => this._accept(socket))
  }

  listen () {
    return new Promise((resolve) => this.server.listen(this.socketPath, resolve))
  }

  _accept (socket) {
    this.socket = socket
    const decoder = new FrameDecoder(FRAME_BYTES)
    socket.on('data', (chunk) => {
      for (const frame of decoder.push(chunk)) this._onframe(frame)
    })
    socket.on('error', () => {})
  }

  send (frame) {
    this.socket.write(encodeFrame(frame, FRAME_BYTES))
  }

  async _onframe (frame) {
    this.frames.push(frame)
    if (frame.op === 'ready') this.ready = frame
    else if (frame.op === 'peers') this.peers = frame
    else if (frame.op === 'cancel') this.cancelled.push(frame.id)
    else if (frame.op === 'result') this.results.set(frame.id, frame)
    else if (frame.op === 'request') {
      await this.handler(frame, this)
    }
  }

  call (frame) {
    this.send({ op: 'call', ...frame })
    return until(() => this.results.get(frame.id), 20000, `result of call ${frame.id}`)
  }

  close () {
    if (this.socket) this.socket.destroy()
    return new Promise((resolve) => this.server.close(resolve))
  }
}

/** An echo-like HAIF: answers {method, peer, value}, streams three chunks when asked. */
async function echoHandler (frame, haif) {
  const { id, method, peer, value } = frame
  if (value.fail) {
    haif.send({ op: 'respond', id, error: { code: value.fail, message: `failed: ${value.fail}`, context: { status: 429, retry_after_s: 2 } } })
  } else if (value.hang) {
    // never answers: the sidecar's deadline must
  } else if (value.stream) {
    for (let i = 0; i < 3; i++) haif.send({ op: 'chunk', id, value: { index: i, method } })
    haif.send({ op: 'end', id })
  } else {
    haif.send({ op: 'respond', id, value: { method, peer, value } })
  }
}

async function startSidecar ({ dir, haif, bootstrap, args = [] }) {
  const child = spawn(process.execPath, [
    SIDECAR,
    '--socket', haif.socketPath,
    '--seed-file', path.join(dir, 'seed'),
    ...bootstrap.flatMap((b) => ['--bootstrap', b]),
    ...args
  ], { env: { ...process.env, HAIF_P2P_SIDECAR_TOKEN: haif.token }, stdio: ['ignore', 'inherit', 'pipe'] })
  child.stderrText = ''
  child.stderr.on('data', (d) => { child.stderrText += d })
  child.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })))
  await until(() => haif.ready || child.exitCode !== null, 20000, 'the sidecar to be ready')
  if (!haif.ready) throw new Error(`sidecar exited: ${child.stderrText}`)
  return child
}

/** A FakeHaif and a sidecar linked to it, both ended when test `t` ends. */
async function setupSidecar (t, bootstrap, { args = [], handler = echoHandler } = {}) {
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

/** A local testnet on 127.0.0.1 (peers there must bind it). */
function testnet () {
  return createTestnet(3, { host: '127.0.0.1' })
}

/** A node on the testnet with the real @hyperswarm/rpc. */
function node (t, bootstrap, seed) {
  const keyPair = DHT.keyPair(seed)
  const dht = new DHT({ keyPair, bootstrap, host: '127.0.0.1' })
  const rpc = new RPC({ dht, keyPair })
  t.after(async () => {
    await rpc.destroy({ force: true })
    await dht.destroy({ force: true })
  })
  return { keyPair, rpc, dht }
}

/** A peer on the testnet, connected to `serverKey`; `events` collects its stream chunks. */
function peer (t, bootstrap, serverKey, seed) {
  const { keyPair, rpc, dht } = node(t, bootstrap, seed)
  const client = rpc.connect(Buffer.from(serverKey, 'hex'))
  const events = []
  client.rpc.respond('haif.stream.chunk', { valueEncoding: c.json }, (event) => { events.push(event); return null })
  return { client, events, keyPair, rpc, dht }
}

module.exports = { FakeHaif, echoHandler, startSidecar, setupSidecar, createTestnet: testnet, node, peer, tmpdir, until, c }
