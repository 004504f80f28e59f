'use strict'
// Outbound: HAIF calls a method of a remote peer (a P2P worker's haif.worker.infer or
// haif.worker.health). Python sends {op: 'call', id, peer, method, value, timeout_ms};
// the sidecar answers {op: 'result', id, value} or {op: 'result', id, error: {code,
// message, context}}, and, when the remote peer streams (haif.stream.chunk events whose
// id is the call's `haif.request_id`), {op: 'chunk', id, value} for each chunk first.
//
// One client (one connection) per remote peer, reused by every call to it. Values are
// sent and read as `raw` and (de)coded here, for the same reason as inbound: a
// malformed answer must be an error, not a SyntaxError inside protomux-rpc.

const c = require('compact-encoding')
const b4a = require('b4a')
const { rpcError, isRpcError, describeRemoteError, toRpcError } = require('./errors')
const { STREAM_EVENT, isObject } = require('./inbound')

const PEER_KEY = /^[0-9a-f]{64}$/
const MAX_METHOD_CHARS = 128
const MAX_TIMEOUT_MS = 3_600_000
const EMPTY = b4a.alloc(0)

class Outbound {
  constructor ({ rpc, link, maxMessageBytes, maxConcurrent, maxConnections, requestTimeoutMs, log, onchange }) {
    this.rpc = rpc
    this.link = link
    this.maxMessageBytes = maxMessageBytes
    this.maxConcurrent = maxConcurrent
    this.maxConnections = maxConnections
    this.requestTimeoutMs = requestTimeoutMs
    this.log = log
    this.onchange = onchange || (() => {})
    this._peers = new Map() // peer hex -> {client, streams: Map(stream id -> call id), inflight}
    this._calls = new Map() // call id -> {cancelled}
  }

  get connections () {
    return this._peers.size
  }

  /** Runs one call frame and answers it on the link; never throws. */
  async call (frame) {
    const id = frame.id
    if (!Number.isSafeInteger(id)) {
      this.log('call frame without an integer id: dropped')
      return
    }
    const state = { cancelled: false }
    let reply
    try {
      reply = { op: 'result', id, value: await this._call(frame, state) }
    } catch (err) {
      const error = toRpcError(err, this.log)
      reply = { op: 'result', id, error: { code: error.code, message: error.message, context: error.context } }
    } finally {
      this._calls.delete(id)
    }
    if (state.cancelled) return
    try {
      this.link.send(reply)
    } catch (err) { // the answer is larger than a frame may be
      this.link.send({ op: 'result', id, error: { code: 'INVALID_REQUEST', message: err.message } })
    }
  }

  cancel (id) {
    const state = this._calls.get(id)
    if (state) state.cancelled = true
  }

  async _call (frame, state) {
    const peer = typeof frame.peer === 'string' ? frame.peer.toLowerCase() : ''
    if (!PEER_KEY.test(peer)) throw rpcError('INVALID_REQUEST', 'peer must be a 64-character hex public key')
    if (typeof frame.method !== 'string' || !frame.method || frame.method.length > MAX_METHOD_CHARS) {
      throw rpcError('INVALID_REQUEST', 'method must be a non-empty string')
    }
    const timeoutMs = Number.isFinite(frame.timeout_ms) && frame.timeout_ms > 0
      ? Math.min(Math.ceil(frame.timeout_ms), MAX_TIMEOUT_MS)
      : this.requestTimeoutMs
    if (this._calls.size >= this.maxConcurrent) {
      throw rpcError('OVERLOADED', 'too many outbound P2P calls in flight (p2p.max_concurrent)')
    }
    const value = frame.value === undefined ? null : frame.value
    const bytes = c.encode(c.json, value)
    if (bytes.byteLength > this.maxMessageBytes) {
      throw rpcError('INVALID_REQUEST', `the value is ${bytes.byteLength} bytes, more than ${this.maxMessageBytes} (p2p.max_message_bytes)`)
    }
    this._calls.set(frame.id, state)
    const entry = this._entry(peer)
    const streamId = isObject(value) && isObject(value.haif) && typeof value.haif.request_id === 'string'
      ? value.haif.request_id
      : null
    if (streamId) entry.streams.set(streamId, frame.id)
    entry.inflight++
    let timer
    try {
      const request = entry.client.request(frame.method, bytes, { valueEncoding: c.raw, timeout: timeoutMs })
      const deadline = new Promise((resolve, reject) => {
        timer = setTimeout(() => reject(rpcError('TIMEOUT', `${frame.method} on ${peer.slice(0, 16)}... gave no answer within ${timeoutMs} ms`)), timeoutMs)
      })
      request.catch(noop) // settles after the deadline, or never: nobody waits for it then
      let raw
      try {
        raw = await Promise.race([request, deadline])
      } catch (err) {
        if (isRpcError(err)) throw err // our deadline
        const remote = describeRemoteError(err)
        if (remote.code === 'UNAVAILABLE' && entry.error) remote.message = `cannot reach the peer: ${entry.error}`
        throw rpcError(remote.code, remote.message, remote.context)
      }
      if (!raw || raw.byteLength > this.maxMessageBytes) {
        throw rpcError('BAD_RESPONSE', `the answer of ${frame.method} exceeds p2p.max_message_bytes`)
      }
      try {
        return c.decode(c.json, raw)
      } catch (err) {
        throw rpcError('BAD_RESPONSE', `the answer of ${frame.method} is not compact-encoding json: ${err.message}`)
      }
    } finally {
      clearTimeout(timer)
      entry.inflight--
      if (streamId && entry.streams.get(streamId) === frame.id) entry.streams.delete(streamId)
    }
  }

  _entry (peer) {
    const known = this._peers.get(peer)
    if (known && !known.client.closed) return known
    if (known) this._peers.delete(peer)
    this._evictIdle()
    const client = this.rpc.connect(b4a.from(peer, 'hex'))
    const entry = { client, streams: new Map(), inflight: 0, error: null }
    // Why a connection failed (PEER_NOT_FOUND, a holepunch that timed out...): the
    // library only reports CHANNEL_CLOSED to the request.
    client.stream.on('error', (err) => { entry.error = err && err.code ? `${err.code}: ${err.message}` : String(err) })
    // The remote peer's stream chunks. Always answers a Buffer: were a peer to send this
    // as a request (not an event), the raw encoder would get it, and anything else
    // there is a TypeError that safety-catch re-throws.
    client.rpc.respond(STREAM_EVENT, { valueEncoding: c.raw }, (raw) => {
      try {
        this._onChunk(entry, raw)
      } catch (err) {
        this.log(`dropped a stream chunk: ${err && err.message}`)
      }
      return EMPTY
    })
    client.on('close', () => {
      if (this._peers.get(peer) === entry) {
        this._peers.delete(peer)
        this.onchange()
      }
    })
    client.on('open', () => this.onchange())
    this._peers.set(peer, entry)
    return entry
  }

  _onChunk (entry, raw) {
    if (!raw || raw.byteLength > this.maxMessageBytes) return
    const message = c.decode(c.json, raw)
    if (!isObject(message) || typeof message.id !== 'string') return
    const callId = entry.streams.get(message.id)
    if (callId === undefined) return
    const state = this._calls.get(callId)
    if (!state || state.cancelled) return
    this.link.send({ op: 'chunk', id: callId, value: message.chunk === undefined ? null : message.chunk })
  }

  _evictIdle () {
    if (this._peers.size < this.maxConnections) return
    for (const [peer, entry] of this._peers) {
      if (entry.inflight === 0) {
        this._peers.delete(peer)
        entry.client.destroy()
        return
      }
    }
  }

  destroy () {
    for (const entry of this._peers.values()) entry.client.destroy()
    this._peers.clear()
  }
}

function noop () {}

module.exports = { Outbound }
