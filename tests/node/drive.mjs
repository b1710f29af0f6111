// Drives the keypool gateway with the official `openai` npm package.
// Usage: node drive.mjs '<json>' where json = {token, requests: [{base, stream}], badToken: base|null}
// Prints one JSON line: {results: [{status, keyId, totalTokens, retryAfter, code}], badTokenStatus}
import OpenAI from "openai";

const plan = JSON.parse(process.argv[2]);
const messages = [{ role: "user", content: "hello from node" }];

async function one(req) {
  const client = new OpenAI({ baseURL: req.base, apiKey: plan.token, maxRetries: 0, timeout: 30000 });
  try {
    if (req.stream) {
      const { data, response } = await client.chat.completions
        .create({ model: plan.model, messages, stream: true, stream_options: { include_usage: true } })
        .withResponse();
      let usage = null;
      for await (const chunk of data) {
        if (chunk.usage) usage = chunk.usage;
      }
      return { status: response.status, keyId: response.headers.get("x-keypool-key-id"),
               totalTokens: usage ? usage.total_tokens : null };
    }
    const { data, response } = await client.chat.completions
      .create({ model: plan.model, messages })
      .withResponse();
    return { status: response.status, keyId: response.headers.get("x-keypool-key-id"),
             totalTokens: data.usage ? data.usage.total_tokens : null };
  } catch (err) {
    if (err instanceof OpenAI.APIError && err.status) {
      return { status: err.status, keyId: err.headers?.["x-keypool-key-id"] ?? null,
               retryAfter: err.headers?.["retry-after"] ?? null, code: err.code ?? null };
    }
    return { status: 0, error: String(err) };
  }
}

const results = await Promise.all(plan.requests.map(one));
let badTokenStatus = null;
if (plan.badToken) {
  const client = new OpenAI({ baseURL: plan.badToken, apiKey: "not-a-token", maxRetries: 0 });
  try {
    await client.chat.completions.create({ model: plan.model, messages });
    badTokenStatus = 200;
  } catch (err) {
    badTokenStatus = err.status ?? 0;
  }
}
console.log(JSON.stringify({ results, badTokenStatus }));
