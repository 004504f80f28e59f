'use strict'
// Errors the sidecar throws out of its @hyperswarm/rpc handlers.
//
// protomux-rpc catches what a handler throws, passes it to safety-catch, and sends it
// to the caller as the `cause` of a REQUEST_ERROR. safety-catch re-throws TypeError,
// SyntaxError, RangeError, ReferenceError, EvalError, URIError and assertion errors on
// a microtask: the process dies. And the response encoder writes `cause.code` and
// `cause.context` with c.string: a non-string there is a TypeError in the encoder, the
// same crash. So every handler ends in `toRpcError`, which hands the library only a
// plain Error whose `code` and `context` are strings.
//
// The caller sees:  err.code === 'REQUEST_ERROR', err.cause.code === <HAIF code>,
// err.cause.message === <message>, err.cause.context === <JSON string: type, code, status...>

const CODE = /^[A-Z][A-Z0-9_]{0,63}$/
const MAX_MESSAGE_CHARS = 1024
const MAX_CONTEXT_CHARS = 4096
const HAIF = Symbol('haif.rpc-error')

/** A plain Error with a HAIF code, safe to throw into @hyperswarm/rpc. */
function rpcError (code, message, context) {
  const err = new Error(clip(String(message), MAX_MESSAGE_CHARS))
  err.code = CODE.test(code) ? code : 'INTERNAL'
  const text = contextText(context)
  if (text) err.context = text
  err[HAIF] = true
  return err
}

/** An error frame's `error` object ({code, message, context}) as an rpcError. */
function fromErrorObject (error) {
  if (error === null || typeof error !== 'object') return rpcError('INTERNAL', 'malformed error from HAIF')
  const message = typeof error.message === 'string' ? error.message : 'request failed'
  return rpcError(typeof error.code === 'string' ? error.code : 'INTERNAL', message, error.context)
}

function isRpcError (err) {
  return Boolean(err && err[HAIF])
}

/** Anything caught as an error the library can carry: ours pass, the rest become INTERNAL. */
function toRpcError (err, log) {
  if (err && err[HAIF]) return err
  if (log) log(`unexpected error in a handler: ${err && err.stack ? err.stack : err}`)
  return rpcError('INTERNAL', 'internal error in the P2P sidecar')
}

/** The {code, message, context} of an error an outbound request got back. */
function describeRemoteError (err) {
  const code = err && typeof err.code === 'string' ? err.code : ''
  const cause = err && err.cause
  if (code === 'REQUEST_ERROR' && cause) {
    return {
      code: typeof cause.code === 'string' && cause.code ? cause.code : 'REMOTE_ERROR',
      message: typeof cause.message === 'string' ? cause.message : 'request failed',
      context: typeof cause.context === 'string' ? cause.context : undefined
    }
  }
  const message = err && typeof err.message === 'string' ? err.message : String(err)
  switch (code) {
    case 'TIMEOUT_EXCEEDED': return { code: 'TIMEOUT', message }
    case 'UNKNOWN_METHOD': return { code: 'UNKNOWN_METHOD', message }
    case 'DECODE_ERROR': return { code: 'INVALID_REQUEST', message }
    case 'ENCODE_ERROR': return { code: 'INTERNAL', message }
    default: return { code: 'UNAVAILABLE', message: code ? `${code}: ${message.replace(code + ': ', '')}` : message }
  }
}

function contextText (context) {
  if (context === undefined || context === null) return null
  let text
  if (typeof context === 'string') text = context
  else {
    try {
      text = JSON.stringify(context)
    } catch {
      return null
    }
  }
  return typeof text === 'string' && text.length <= MAX_CONTEXT_CHARS ? text : null
}

function clip (text, max) {
  return text.length <= max ? text : text.slice(0, max - 3) + '...'
}

module.exports = { rpcError, isRpcError, fromErrorObject, toRpcError, describeRemoteError }
