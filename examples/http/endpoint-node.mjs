// A minimal HTTP endpoint for `notifyq serve` (node:http, no dependencies): it verifies the
// Notifyq-Signature with verify-node.mjs, answers 401 when it does not hold, and otherwise
// runs the job (here: nothing) and answers 200 with a JSON result.
//
//   NOTIFYQ_SECRET=... PORT=8080 node endpoint-node.mjs
//
// PORT=0 picks a free port; the first line on stdout says which.  One line per request.
import { createServer } from "node:http";
import { verify, SignatureError } from "./verify-node.mjs";

const secret = process.env.NOTIFYQ_SECRET;
if (!secret) {
  console.error("endpoint-node: set NOTIFYQ_SECRET to the secret notifyq serve signs with");
  process.exit(2);
}
const MAX_BODY = 10 * 1024 * 1024;

function reply(res, status, result) {
  const body = JSON.stringify(result);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  res.end(body);
}

async function handle(req, res) {
  if (req.method !== "POST") return [405, { ok: false, error: "POST only" }];
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY) return [413, { ok: false, error: "body over 10 MiB" }];
    chunks.push(chunk);
  }
  const rawBody = Buffer.concat(chunks);
  try {
    verify(secret, req.headers, rawBody); // the raw bytes, before JSON.parse
  } catch (error) {
    if (error instanceof SignatureError) return [401, { ok: false, error: error.message }];
    throw error;
  }
  let job;
  try {
    job = JSON.parse(rawBody.toString("utf8"));
  } catch {
    return [400, { ok: false, error: "body is not JSON" }];
  }
  // Your handler goes here: job.task, job.payload, job.attempt, ...
  return [200, { ok: true, id: job?.id ?? null }];
}

const server = createServer((req, res) => {
  handle(req, res).then(
    ([status, result]) => {
      reply(res, status, result);
      console.log(`${req.method} ${req.url} ${status} ${result.ok ? `id=${result.id}` : result.error}`);
    },
    (error) => {
      if (!res.headersSent) reply(res, 500, { ok: false, error: "internal error" });
      console.log(`${req.method} ${req.url} 500 ${error?.stack ?? error}`);
    },
  );
});

server.listen(Number(process.env.PORT ?? 8080), process.env.HOST ?? "127.0.0.1", () => {
  const { address, port } = server.address();
  console.log(`endpoint-node listening on http://${address}:${port}`);
});

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
