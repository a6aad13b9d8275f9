// Enqueue a notifyq job from Node.js with the standard `pg` client.
//   npm install pg
//   DATABASE_URL="$(notifyq dsn)" node examples/enqueue.mjs Ada
import pg from "pg";

const client = new pg.Client({ connectionString: process.env.DATABASE_URL });
await client.connect();
try {
  // Parameters, never string concatenation; the payload is sent as JSON text.
  const { rows } = await client.query(
    "INSERT INTO notifyq.jobs (task, payload, priority) VALUES ($1, $2::jsonb, $3) RETURNING id",
    ["hello.greet", JSON.stringify({ name: process.argv[2] ?? "Node" }), 0],
  );
  console.log(`enqueued job ${rows[0].id}`);
} catch (err) {
  // A CHECK constraint names the rule a bad job broke, e.g. jobs_queue_format.
  console.error(`rejected: ${err.message} (${err.constraint ?? err.code})`);
  process.exitCode = 1;
} finally {
  await client.end();
}
