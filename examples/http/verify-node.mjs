// Verify the Notifyq-Signature header of a request `notifyq serve` delivered: Node.js, node:crypto.
// Copy this file into your service; no dependencies.
//
//   import { verify } from "./verify-node.mjs";
//   verify(process.env.NOTIFYQ_SECRET, req.headers, rawBody); // throws SignatureError
//
// `headers`: Node's req.headers, a Fetch Headers object or a plain object (any case).
// `rawBody`: the request body exactly as received, as a Buffer/Uint8Array, never
// JSON.stringify(JSON.parse(...)): re-serialised JSON is other bytes and fails.
// `now`: Unix seconds (default: the clock); `tolerance`: seconds a signature stays valid.
import { createHmac, timingSafeEqual } from "node:crypto";

export const SIGNATURE_HEADER = "Notifyq-Signature";

export class SignatureError extends Error {
  name = "SignatureError";
}

export function verify(secret, headers, rawBody, { tolerance = 300, now } = {}) {
  if (typeof secret !== "string" || secret === "") {
    throw new TypeError("verify() needs the endpoint's secret as a non-empty string");
  }
  if (!(rawBody instanceof Uint8Array)) {
    throw new TypeError("rawBody must be the raw request bytes (Buffer/Uint8Array), not a string or parsed JSON");
  }
  if (!(tolerance >= 0)) throw new TypeError(`tolerance must be >= 0 seconds, not ${tolerance}`);
  const value = header(headers);
  if (value == null) throw new SignatureError(`no ${SIGNATURE_HEADER} header: the request was not signed`);
  const { timestamp, candidates } = parse(value);
  const expected = Buffer.from(
    createHmac("sha256", secret).update(`${timestamp}.`).update(rawBody).digest("hex"),
  );
  let matched = false;
  for (const candidate of candidates) {
    // Both are 64 ASCII hex digits (parse() checked), as timingSafeEqual requires.
    matched = timingSafeEqual(expected, Buffer.from(candidate.toLowerCase())) || matched;
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
