'use strict'
// The link to HAIF's Python side: one Unix socket connection, frames both ways
// (lib/frames.js). The sidecar connects to the socket its supervisor listens on,
// introduces itself with {op: 'hello', token, pid}, and lives as long as the link: when
// the socket closes, the sidecar exits (its supervisor is gone, or starts a new one).

const net = require('net')
const { EventEmitter } = require('events')
const { FrameDecoder, encodeFrame } = require('./frames')
const { rpcError, fromErrorObject } = require('./errors')

class PythonLink extends EventEmitter {
  constructor ({ socketPath, token, maxFrameBytes, log }) {
    super()
    this.socketPath = socketPath
    this.token = token
    this.maxFrameBytes = maxFrameBytes
    this.log = log
    this.socket = null
    this.connected = false
    this._nextId = 1
    this._pending = new Map() // inbound request id -> {resolve, reject, onchunk, chunks}
  }

  connect () {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection(this.socketPath)
      const decoder = new FrameDecoder(this.maxFrameBytes)
      socket.once('connect', () => {
        this.socket = socket
        this.connected = true
        this.send({ op: 'hello', token: this.token, pid: process.pid })
        resolve()
      })
      socket.on('data', (chunk) => {
        let frames
        try {
          frames = decoder.push(chunk)
        } catch (err) {
          this.log(`bad frame from HAIF, closing the link: ${err.message}`)
          socket.destroy()
          return
        }
        for (const frame of frames) this._dispatch(frame)
      })
      socket.on('error', (err) => {
        if (!this.connected) reject(err)
        else this.log(`link error: ${err.message}`)
      })
      socket.on('close', () => {
        const was = this.connected
        this.connected = false
        for (const pending of this._pending.values()) pending.reject(rpcError('UNAVAILABLE', 'HAIF is not reachable'))
        this._pending.clear()
        if (was) this.emit('close')
      })
    })
  }

  /** Sends one frame; false when the link is down. Throws FrameError when too large. */
  send (message) {
    if (!this.connected) return false
    this.socket.write(encodeFrame(message, this.maxFrameBytes))
    return true
  }

  /**
   * Hands an inbound RPC request to HAIF. Resolves with {value} for a plain answer or
   * {stream: true, chunks, value} after a stream's end; rejects with an rpcError.
   * `onchunk` is called with each streamed chunk, in order.
   */
  request ({ method, peer, value }, onchunk) {
    const id = this._nextId++
    const promise = new Promise((resolve, reject) => {
      if (!this.connected) {
        reject(rpcError('UNAVAILABLE', 'HAIF is not reachable'))
        return
      }
      this._pending.set(id, { resolve, reject, onchunk, chunks: 0 })
      try {
        this.send({ op: 'request', id, method, peer, value })
      } catch (err) {
        this._pending.delete(id)
        reject(rpcError('INVALID_REQUEST', err.message))
      }
    })
    return { id, promise }
  }

  /** Tells HAIF that `chunks` more chunks of stream `id` left for the peer (backpressure). */
  ack (id, chunks) {
    if (this._pending.has(id)) this.send({ op: 'ack', id, chunks })
  }

  /** Gives up on an inbound request (deadline, peer gone): HAIF stops working on it. */
  cancel (id, error) {
    const pending = this._pending.get(id)
    if (pending === undefined) return
    this._pending.delete(id)
    this.send({ op: 'cancel', id })
    pending.reject(error)
  }

  _dispatch (frame) {
    switch (frame.op) {
      case 'respond':
      case 'end':
        return this._settle(frame)
      case 'chunk':
        return this._chunk(frame)
      case 'call':
        return this.emit('call', frame)
      case 'cancel':
        return this.emit('cancel', frame.id)
      default:
        this.log(`unknown frame op from HAIF: ${String(frame.op).slice(0, 64)}`)
    }
  }

  _settle (frame) {
    const pending = this._pending.get(frame.id)
    if (pending === undefined) return // cancelled meanwhile
    this._pending.delete(frame.id)
    if (frame.op === 'respond' && frame.error !== undefined) pending.reject(fromErrorObject(frame.error))
    else if (frame.op === 'respond') pending.resolve({ value: frame.value })
    else pending.resolve({ stream: true, chunks: pending.chunks, value: frame.value })
  }

  _chunk (frame) {
    const pending = this._pending.get(frame.id)
    if (pending === undefined) return
    pending.chunks++
    try {
      pending.onchunk(frame.value)
    } catch (err) {
      this.cancel(frame.id, err)
    }
  }
}

module.exports = { PythonLink }
