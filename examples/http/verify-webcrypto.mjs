// Verify the Notifyq-Signature header of a request `notifyq serve` delivered, with Web Crypto
// only: runs unchanged in Deno, Supabase and Netlify edge functions, Cloudflare Workers, Bun
// and Node >= 20.  Copy this file into your function; no dependencies.
//
//   import { verify } from "./verify-webcrypto.mjs";
//   const rawBody = new Uint8Array(await req.arrayBuffer()); // before any req.json()
//   await verify(secret, req.headers, rawBody); // throws SignatureError
//
// `headers`: a Fetch Headers object or a plain object (any case).  `rawBody`: the body
// exactly as received (Uint8Array or ArrayBuffer); re-serialised JSON is other bytes and
// fails.  `now`: Unix seconds (default: the clock); `tolerance`: seconds a signature is valid.
// crypto.subtle.verify compares the MAC in constant time.

export const SIGNATURE_HEADER = "Notifyq-Signature";

export class SignatureError extends Error {
  name = "SignatureError";
}

const encoder = new TextEncoder();

export async function verify(secret, headers, rawBody, { tolerance = 300, now } = {}) {
  if (typeof secret !== "string" || secret === "") {
    throw new TypeError("verify() needs the endpoint's secret as a non-empty string");
  }
  if (rawBody instanceof ArrayBuffer) rawBody = new Uint8Array(rawBody);
  if (!(rawBody instanceof Uint8Array)) {
    throw new TypeError("rawBody must be the raw request bytes (Uint8Array/ArrayBuffer), not a string or parsed JSON");
  }
  if (!(tolerance >= 0)) throw new TypeError(`tolerance must be >= 0 seconds, not ${tolerance}`);
  const value = header(headers);
  if (value == null) throw new SignatureError(`no ${SIGNATURE_HEADER} header: the request was not signed`);
  const { timestamp, candidates } = parse(value);
  const key = await crypto.subtle.importKey(
    "raw", encoder.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["verify"],
  );
  const prefix = encoder.encode(`${timestamp}.`);
  const message = new Uint8Array(prefix.length + rawBody.length);
  message.set(prefix);
  message.set(rawBody, prefix.length);
  let matched = false;
  for (const candidate of candidates) {
    matched = (await crypto.subtle.verify("HMAC", key, fromHex(candidate), message)) || matched;
  }
  if (!matched) {
    throw new SignatureError(
      `no v1 signature in ${SIGNATURE_HEADER} matches this body and secret: a wrong secret, ` +
        "or a body that is not the raw bytes received, or a changed request",
    );
  }
  const clock = now ?? Date.now() / 1000;
  if (timestamp < clock - tolerance) {
    throw new SignatureError(
      `${SIGNATURE_HEADER} timestamp is ${Math.round(clock - timestamp)} s old, more than the tolerance of ${tolerance} s`,
    );
  }
  if (timestamp > clock + tolerance) {
    throw new SignatureError(
      `${SIGNATURE_HEADER} timestamp is ${Math.round(timestamp - clock)} s in the future, more than the tolerance of ${tolerance} s`,
    );
  }
}

function fromHex(hex) {
  const bytes = new Uint8Array(hex.length / 2);
  for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return bytes;
}

function header(headers) {
  if (typeof headers?.get === "function") return headers.get(SIGNATURE_HEADER); // Fetch Headers
  const wanted = SIGNATURE_HEADER.toLowerCase();
  for (const [name, value] of Object.entries(headers ?? {})) {
    if (name.toLowerCase() === wanted) return Array.isArray(value) ? value.join(",") : value;
  }
  return null;
}

function parse(value) {
  const malformed = (why) => new SignatureError(`malformed ${SIGNATURE_HEADER} header: ${why}`);
  const timestamps = [];
  const candidates = [];
  for (const part of String(value).split(",")) {
    const item = part.trim();
    const eq = item.indexOf("=");
    const key = eq < 0 ? item : item.slice(0, eq);
    const rest = eq < 0 ? "" : item.slice(eq + 1);
    if (key === "t") timestamps.push(rest);
    else if (key === "v1") {
      if (!/^[0-9a-fA-F]{64}$/.test(rest)) throw malformed("v1 must be 64 hex digits");
      candidates.push(rest);
    } // other keys (a later scheme) are skipped
  }
  if (timestamps.length !== 1 || !/^[0-9]{1,12}$/.test(timestamps[0])) {
    throw malformed("expected one t=<unix seconds>, as in t=1733450000,v1=<hex>");
  }
  if (candidates.length === 0) throw malformed("no v1=<hex> signature");
  return { timestamp: Number(timestamps[0]), candidates };
}
