'use strict'
// The Python link's framing: a 4-byte big-endian length, then that many bytes of UTF-8
// JSON (one object per frame). The same format as haif/p2p/_frames.py.

const HEADER_BYTES = 4

class FrameError extends Error {
  constructor (message) {
    super(message)
    this.code = 'FRAME_ERROR'
  }
}

/** One frame for `message`; throws FrameError past `maxBytes` of JSON. */
function encodeFrame (message, maxBytes) {
  const body = Buffer.from(JSON.stringify(message), 'utf8')
  if (body.byteLength > maxBytes) {
    throw new FrameError(`frame of ${body.byteLength} bytes exceeds ${maxBytes}`)
  }
  const frame = Buffer.allocUnsafe(HEADER_BYTES + body.byteLength)
  frame.writeUInt32BE(body.byteLength, 0)
  body.copy(frame, HEADER_BYTES)
  return frame
}

/**
 * Splits a byte stream into decoded frames. `push` returns the frames completed by a
 * chunk; it throws FrameError on an oversize length or a body that is not a JSON object
 * (the peer of this link is our own process: a bad frame ends the link).
 */
class FrameDecoder {
  constructor (maxBytes) {
    this.maxBytes = maxBytes
    this._chunks = []
    this._buffered = 0
  }

  push (chunk) {
    this._chunks.push(chunk)
    this._buffered += chunk.byteLength
    const frames = []
    while (this._buffered >= HEADER_BYTES) {
      const head = this._peek(HEADER_BYTES)
      const length = head.readUInt32BE(0)
      if (length > this.maxBytes) throw new FrameError(`frame of ${length} bytes exceeds ${this.maxBytes}`)
      if (this._buffered < HEADER_BYTES + length) break
      const body = this._take(HEADER_BYTES + length).subarray(HEADER_BYTES)
      let message
      try {
        message = JSON.parse(body.toString('utf8'))
      } catch (err) {
        throw new FrameError(`frame is not JSON: ${err.message}`)
      }
      if (message === null || typeof message !== 'object' || Array.isArray(message)) {
        throw new FrameError('frame is not a JSON object')
      }
      frames.push(message)
    }
    return frames
  }

  _peek (n) {
    if (this._chunks[0].byteLength < n) this._chunks = [Buffer.concat(this._chunks)]
    return this._chunks[0].subarray(0, n)
  }

  _take (n) {
    const all = this._chunks.length === 1 ? this._chunks[0] : Buffer.concat(this._chunks)
    const out = all.subarray(0, n)
    const rest = all.subarray(n)
    this._chunks = rest.byteLength ? [rest] : []
    this._buffered -= n
    return out
  }
}

module.exports = { HEADER_BYTES, FrameError, FrameDecoder, encodeFrame }
