'use strict'
// Inbound: peers call HAIF. Each served method takes and answers a compact-encoding
// `json` value; the handler checks it (size, JSON, an object), bounds the requests in
// flight, hands it to HAIF over the link and answers with what HAIF answers.
//
// The methods are registered with the `raw` encoding and decoded here: with
// `valueEncoding: c.json` protomux-rpc would JSON.parse a peer's bytes itself, and the
// SyntaxError of a malformed value goes through safety-catch, which re-throws it: one
// bad request would kill the process.
//
// Streaming (HAIF answers with chunks): each chunk goes to the peer as a protomux-rpc
// *event* (a request with id 0, no answer) named `haif.stream.chunk` on the same
// connection, value {id: <stream id>, chunk: <chunk>}; the request itself is answered
// last, with {object: 'haif.stream.end', id: <stream id>, chunks: <count>}. One channel
// carries both in order, so every chunk arrives before the answer. The stream id is
// the request's `haif.request_id` when it gives one (what a caller with several streams
// on one connection tells them apart by), else one the sidecar makes up.
//
// Backpressure: each chunk HAIF sends is acknowledged (`ack` frames) once the
// connection's stream has taken it without pushing back, or, when it pushed back
// (a peer that reads slower than HAIF writes), once it drains. HAIF holds at most
// p2p.max_stream_buffer_bytes of a stream's chunks unacknowledged, so a slow peer
// stops the stream at HAIF instead of piling its chunks up here.
//
// Two lanes: requests from keys HAIF has served before take the `maxConcurrent` slots;
// requests from other keys (strangers, or peers on their first request) are forwarded
// at most `maxUnverified` at a time and wait for a slot within their deadline, so that
// a flood of unknown keys, each answered UNAUTHORIZED by HAIF, never takes served peers'
// slots. Which keys were served only picks the lane: HAIF authenticates every request.

const c = require('compact-encoding')
const crypto = require('crypto')
const { rpcError, toRpcError } = require('./errors')

const STREAM_EVENT = 'haif.stream.chunk'
const STREAM_END = 'haif.stream.end'
const MAX_STREAM_ID_CHARS = 128
const MAX_VERIFIED_KEYS = 8192 // keys remembered as served (the oldest forgotten first)

class Inbound {
  constructor ({ link, maxMessageBytes, maxConcurrent, maxUnverified, requestTimeoutMs, log }) {
    this.link = link
    this.maxMessageBytes = maxMessageBytes
    this.maxConcurrent = maxConcurrent
    this.maxUnverified = Math.min(maxUnverified || maxConcurrent, maxConcurrent)
    this.requestTimeoutMs = requestTimeoutMs
    this.log = log
    this.inflight = 0 // served keys' requests at HAIF
    this.unverified = 0 // other keys' requests at HAIF
    this._waiting = [] // other keys' requests waiting for a slot, oldest first
    this._verified = new Map() // key hex -> true, in the order last served (an LRU)
    this._connections = new Map() // ProtomuxRPC -> Connection, oldest first
    this._acks = new Map() // link request id -> chunks to acknowledge on the next tick
    this._flushing = false
  }

  /** Registers `methods` on an @hyperswarm/rpc server (before it accepts connections). */
  register (server, methods) {
    for (const method of methods) {
      server.respond(method, { valueEncoding: c.raw }, (raw, rpc) => this.handle(method, raw, rpc))
    }
  }

  /** A new connection: what is in flight on it is cancelled when it closes. */
  attach (rpc) {
    const conn = { rpc, key: remoteKey(rpc), ids: new Set(), active: 0, unacked: new Map() }
    this._connections.set(rpc, conn)
    // A peer that reads slower than HAIF streams: its chunks are acknowledged when the
    // connection's stream has drained (see _sent).
    const stream = rpc.stream
    const ondrain = () => this._drained(conn)
    if (stream) stream.on('drain', ondrain)
    rpc.on('close', () => {
      if (stream) stream.removeListener('drain', ondrain)
      this._connections.delete(rpc)
      for (const id of conn.ids) this.link.cancel(id, rpcError('UNAVAILABLE', 'the connection closed'))
      conn.ids.clear()
      conn.unacked.clear()
      for (const waiter of this._waiting.filter((w) => w.conn === conn)) waiter.fail(rpcError('UNAVAILABLE', 'the connection closed'))
    })
  }

  /**
   * Room for one more connection past the limit: closes the oldest connection with no
   * request in flight, a stranger's first, else a served peer's. False when every open
   * connection is busy (the new one should then be refused).
   */
  evictFor (rpc) {
    let idleServed = null
    for (const conn of this._connections.values()) {
      if (conn.rpc === rpc || conn.active > 0) continue
      if (!this._verified.has(conn.key)) {
        conn.rpc.destroy()
        return true
      }
      if (idleServed === null) idleServed = conn
    }
    if (idleServed === null) return false
    idleServed.rpc.destroy()
    return true
  }

  async handle (method, raw, rpc) {
    const conn = this._connections.get(rpc)
    if (conn) conn.active++
    try {
      return await this._handle(method, raw, rpc, conn)
    } catch (err) {
      throw toRpcError(err, this.log)
    } finally {
      if (conn) conn.active--
    }
  }

  async _handle (method, raw, rpc, conn) {
    const started = Date.now()
    const value = this._decode(raw)
    const key = conn ? conn.key : remoteKey(rpc)
    const timeoutMs = deadlineMs(value, this.requestTimeoutMs)
    const lane = await this._enter(key, conn, started + timeoutMs)
    try {
      if (!this.link.connected) {
        throw rpcError('UNAVAILABLE', 'HAIF is not reachable', { type: 'service_unavailable', code: 'service_unavailable', status: 503 })
      }
      const outcome = await this._forward(method, key, value, rpc, conn, timeoutMs, Math.max(1, started + timeoutMs - Date.now()))
      this._served(key) // only an answer counts: HAIF refuses some bad input before it authenticates
      return outcome
    } catch (err) {
      if (err && err.code === 'UNAUTHORIZED') this._verified.delete(key)
      throw err
    } finally {
      this._leave(lane)
    }
  }

  // timeoutMs is the request's deadline (what the error names); leftMs what remains of it after the wait for a slot.
  async _forward (method, key, value, rpc, conn, timeoutMs, leftMs) {
    const streamId = streamIdOf(value)
    let id = 0
    const request = this.link.request(
      { method, peer: key, value },
      (chunk) => this._sendChunk(rpc, conn, id, streamId, chunk)
    )
    id = request.id
    if (conn) conn.ids.add(id)
    const timer = setTimeout(() => this.link.cancel(id, rpcError(
      'TIMEOUT', `no answer within ${timeoutMs} ms`, { type: 'timeout_error', code: 'timeout', status: 504 }
    )), leftMs)
    try {
      const outcome = await request.promise
      if (!outcome.stream) return this._encode(outcome.value === undefined ? null : outcome.value)
      const extra = isObject(outcome.value) ? outcome.value : {}
      return this._encode({ ...extra, object: STREAM_END, id: streamId, chunks: outcome.chunks })
    } finally {
      clearTimeout(timer)
      this._acks.delete(id)
      if (conn) {
        conn.ids.delete(id)
        conn.unacked.delete(id)
      }
    }
  }

  // --- lanes ------------------------------------------------------------------------------

  _enter (key, conn, deadline) {
    if (this._verified.has(key)) {
      if (this.inflight >= this.maxConcurrent) throw overloaded(this.inflight)
      this.inflight++
      return Promise.resolve('served')
    }
    if (this.unverified + this._waiting.length >= this.maxConcurrent) throw overloaded(this.unverified + this._waiting.length)
    if (this.unverified < this.maxUnverified) {
      this.unverified++
      return Promise.resolve('new')
    }
    return new Promise((resolve, reject) => {
      const waiter = {
        conn,
        start: () => {
          clearTimeout(waiter.timer)
          this.unverified++
          resolve('new')
        },
        fail: (err) => {
          clearTimeout(waiter.timer)
          const at = this._waiting.indexOf(waiter)
          if (at !== -1) this._waiting.splice(at, 1)
          reject(err)
        }
      }
      waiter.timer = setTimeout(() => waiter.fail(rpcError(
        'TIMEOUT', 'no answer within the deadline (waited for a slot: p2p.max_concurrent_unverified)',
        { type: 'timeout_error', code: 'timeout', status: 504 }
      )), Math.max(1, deadline - Date.now()))
      this._waiting.push(waiter)
    })
  }

  _leave (lane) {
    if (lane === 'served') {
      this.inflight--
      return
    }
    this.unverified--
    const next = this._waiting.shift()
    if (next) next.start()
  }

  _served (key) {
    if (!key) return
    this._verified.delete(key)
    this._verified.set(key, true)
    if (this._verified.size > MAX_VERIFIED_KEYS) this._verified.delete(this._verified.keys().next().value)
  }

  // --- values -----------------------------------------------------------------------------

  _decode (raw) {
    const size = raw ? raw.byteLength : 0
    if (size > this.maxMessageBytes) {
      throw rpcError('INVALID_REQUEST', `the value is ${size} bytes, more than ${this.maxMessageBytes} (p2p.max_message_bytes)`,
        { type: 'invalid_request_error', code: 'request_too_large', status: 413 })
    }
    let value
    try {
      value = c.decode(c.json, raw)
    } catch (err) {
      throw rpcError('INVALID_REQUEST', `the value is not compact-encoding json: ${err.message}`, invalid())
    }
    if (!isObject(value)) throw rpcError('INVALID_REQUEST', 'the value must be a JSON object: the HTTP API\'s request body', invalid())
    return value
  }

  _encode (value) {
    const bytes = c.encode(c.json, value)
    if (bytes.byteLength > this.maxMessageBytes) {
      throw rpcError('INVALID_REQUEST', `the answer is ${bytes.byteLength} bytes, more than ${this.maxMessageBytes} (p2p.max_message_bytes)`,
        { type: 'invalid_request_error', code: 'response_too_large', status: 413 })
    }
    return bytes
  }

  // --- streams and their backpressure -------------------------------------------------------

  _sendChunk (rpc, conn, id, streamId, chunk) {
    if (rpc.closed) throw rpcError('UNAVAILABLE', 'the connection closed')
    rpc.event(STREAM_EVENT, this._encode({ id: streamId, chunk: chunk === undefined ? null : chunk }), { valueEncoding: c.raw })
    this._sent(rpc, conn, id)
  }

  /** A chunk was written: acknowledged now, or when the connection's stream drains. */
  _sent (rpc, conn, id) {
    if (!conn || rpc.mux.drained) {
      this._ack(id, 1)
      return
    }
    conn.unacked.set(id, (conn.unacked.get(id) || 0) + 1)
  }

  _drained (conn) {
    for (const [id, n] of conn.unacked) this._ack(id, n)
    conn.unacked.clear()
  }

  /** Acknowledgements leave in one frame per request and tick, however many chunks. */
  _ack (id, n) {
    this._acks.set(id, (this._acks.get(id) || 0) + n)
    if (this._flushing) return
    this._flushing = true
    setImmediate(() => {
      this._flushing = false
      for (const [ackId, chunks] of this._acks) this.link.ack(ackId, chunks)
      this._acks.clear()
    })
  }
}

function overloaded (count) {
  return rpcError('OVERLOADED', `the P2P shim is serving ${count} requests, its most (p2p.max_concurrent)`,
    { type: 'rate_limit_error', code: 'overloaded', status: 429, retry_after_s: 1 })
}

function streamIdOf (value) {
  const haif = value.haif
  if (isObject(haif) && typeof haif.request_id === 'string' && haif.request_id.length > 0 &&
      haif.request_id.length <= MAX_STREAM_ID_CHARS) return haif.request_id
  return 'p2p-' + crypto.randomBytes(12).toString('hex')
}

function deadlineMs (value, defaultMs) {
  const haif = value.haif
  const asked = isObject(haif) && typeof haif.timeout_s === 'number' && Number.isFinite(haif.timeout_s) && haif.timeout_s > 0
    ? Math.ceil(haif.timeout_s * 1000)
    : defaultMs
  return Math.max(1, Math.min(asked, defaultMs))
}

function remoteKey (rpc) {
  const key = rpc && rpc.stream && rpc.stream.remotePublicKey
  return key ? Buffer.from(key).toString('hex') : ''
}

function invalid () {
  return { type: 'invalid_request_error', code: 'invalid_request', status: 400 }
}

function isObject (value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value)
}

module.exports = { Inbound, STREAM_EVENT, STREAM_END, isObject }
