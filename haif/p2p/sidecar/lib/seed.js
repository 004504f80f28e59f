'use strict'
// The key seed: 32 random bytes in a file, created on first start. hyperdht's
// keyPair(seed) is sodium's crypto_sign_seed_keypair (Ed25519), so the public key is
// the same on every start, and haif/p2p/keys.py computes it without Node.

const fs = require('fs')
const path = require('path')
const crypto = require('crypto')

const SEED_BYTES = 32

function loadOrCreateSeed (file) {
  try {
    return check(fs.readFileSync(file), file)
  } catch (err) {
    if (err.code !== 'ENOENT') throw err
  }
  fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 })
  const seed = crypto.randomBytes(SEED_BYTES)
  const tmp = `${file}.${process.pid}.${crypto.randomBytes(4).toString('hex')}.tmp`
  fs.writeFileSync(tmp, seed, { flag: 'wx', mode: 0o600 })
  try {
    // link() never replaces: a process that created the file first wins, and its seed
    // is used; nobody ever reads a half-written seed.
    fs.linkSync(tmp, file)
    return seed
  } catch (err) {
    if (err.code !== 'EEXIST') throw err
    return check(fs.readFileSync(file), file)
  } finally {
    fs.rmSync(tmp, { force: true })
  }
}

function check (seed, file) {
  if (seed.byteLength !== SEED_BYTES) {
    throw new Error(`seed file ${file} holds ${seed.byteLength} bytes, not ${SEED_BYTES}`)
  }
  return seed
}

module.exports = { SEED_BYTES, loadOrCreateSeed }
