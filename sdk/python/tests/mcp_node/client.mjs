// The official TypeScript MCP client (Client + StreamableHTTPClientTransport), scripted from the
// command line, for Leash's MCP tests:
//
//   node client.mjs URL STEP...
//
// Steps, in order, in one MCP session:
//   list                  tools/list; prints {"step":"list","result":{tools...}}
//   call NAME JSON        tools/call of NAME with the JSON object as arguments; prints
//                         {"step":"call","name":NAME,"result":{...},"progress":[...],"messages":[...]}
//                         (the progress notifications and log messages received during the call)
// A step that fails prints {"step":...,"error":{"code":...,"message":...}} and the script goes
// on; a failure to connect prints {"step":"connect","error":...} and exits 1. One JSON line per
// step on stdout, and nothing else there.
//
// Environment:
//   MCP_ACCESS_TOKEN, MCP_DPOP_JWK  the access token and the private Ed25519 JWK (JSON) of its
//       DPoP key: every HTTP request then carries `Authorization: DPoP <token>` and a fresh
//       DPoP proof (RFC 9449; `ath` of the token; a `use_dpop_nonce` answer, 401 with
//       `DPoP-Nonce`, is retried once with the nonce, which later proofs carry). Without them the
//       client sends no auth.
//   MCP_ELICIT  the answer to an `elicitation/create` from the server, as JSON (e.g.
//       {"action":"accept","content":{"email":"x@example.com"}}); default {"action":"decline"}.
//       Each elicitation received is printed as {"elicitation":{params}}.
//   MCP_TIMEOUT_MS  the timeout of each request (default 300000; progress resets it).
import { createHash, createPrivateKey, randomUUID, sign } from "node:crypto";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import {
  ElicitRequestSchema,
  LoggingMessageNotificationSchema,
} from "@modelcontextprotocol/sdk/types.js";

const print = (value) => process.stdout.write(`${JSON.stringify(value)}\n`);

const b64url = (bytes) => Buffer.from(bytes).toString("base64url");

// A fetch that signs each request with a DPoP proof for `token`, bound to the private JWK `jwk`.
export function dpopFetch(token, jwk, baseFetch = fetch) {
  if (jwk.kty !== "OKP" || jwk.crv !== "Ed25519" || !jwk.d) {
    throw new Error("MCP_DPOP_JWK must be a private Ed25519 JWK (kty OKP, crv Ed25519, d)");
  }
  const key = createPrivateKey({ key: jwk, format: "jwk" });
  const header = { typ: "dpop+jwt", alg: "EdDSA", jwk: { kty: "OKP", crv: "Ed25519", x: jwk.x } };
  const ath = b64url(createHash("sha256").update(token, "ascii").digest());
  let nonce;

  const proof = (method, url) => {
    const htu = new URL(url);
    htu.search = "";
    htu.hash = "";
    const claims = {
      jti: randomUUID(),
      htm: method,
      htu: htu.href,
      iat: Math.floor(Date.now() / 1000),
      ath,
      ...(nonce === undefined ? {} : { nonce }),
    };
    const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
    return `${input}.${b64url(sign(null, Buffer.from(input, "ascii"), key))}`;
  };

  return async (input, init = {}) => {
    const url = input instanceof Request ? input.url : String(input);
    const method = (init.method ?? (input instanceof Request ? input.method : "GET")).toUpperCase();
    const send = () => {
      const headers = new Headers(init.headers ?? (input instanceof Request ? input.headers : {}));
      headers.set("Authorization", `DPoP ${token}`);
      headers.set("DPoP", proof(method, url));
      return baseFetch(input, { ...init, headers });
    };
    let response = await send();
    const fresh = response.headers.get("DPoP-Nonce");
    if (fresh) {
      const retry =
        response.status === 401 &&
        /error="?use_dpop_nonce/.test(response.headers.get("WWW-Authenticate") ?? "") &&
        fresh !== nonce;
      nonce = fresh;
      if (retry) {
        await response.body?.cancel();
        response = await send();
        nonce = response.headers.get("DPoP-Nonce") ?? nonce;
      }
    }
    return response;
  };
}

function parseSteps(args) {
  const steps = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === "list") {
      steps.push({ step: "list" });
    } else if (args[i] === "call" && i + 2 < args.length) {
      steps.push({ step: "call", name: args[i + 1], arguments: JSON.parse(args[i + 2]) });
      i += 2;
    } else {
      throw new Error(`bad step at ${JSON.stringify(args[i])}: expected "list" or "call NAME JSON"`);
    }
  }
  return steps;
}

const errorOf = (error) => ({
  code: error?.code ?? null,
  message: String(error?.message ?? error),
});

async function main() {
  const [url, ...rest] = process.argv.slice(2);
  if (!url) {
    console.error("usage: node client.mjs URL [list | call NAME JSON]...");
    process.exit(2);
  }
  const steps = parseSteps(rest);
  const { MCP_ACCESS_TOKEN: token, MCP_DPOP_JWK: jwk } = process.env;
  if (Boolean(token) !== Boolean(jwk)) {
    throw new Error("set both MCP_ACCESS_TOKEN and MCP_DPOP_JWK, or neither");
  }
  const elicitAnswer = JSON.parse(process.env.MCP_ELICIT ?? '{"action":"decline"}');
  const timeout = Number(process.env.MCP_TIMEOUT_MS ?? 300000);

  const transport = new StreamableHTTPClientTransport(new URL(url), {
    ...(token ? { fetch: dpopFetch(token, JSON.parse(jwk)) } : {}),
  });
  const client = new Client(
    { name: "leash-mcp-harness", version: "1.0.0" },
    { capabilities: { elicitation: { form: {} } } },
  );
  const messages = [];
  client.setNotificationHandler(LoggingMessageNotificationSchema, (notification) => {
    messages.push(notification.params);
  });
  client.setRequestHandler(ElicitRequestSchema, (request) => {
    print({ elicitation: request.params });
    return elicitAnswer;
  });

  try {
    await client.connect(transport);
  } catch (error) {
    print({ step: "connect", error: errorOf(error) });
    process.exit(1);
  }
  for (const step of steps) {
    try {
      if (step.step === "list") {
        print({ step: "list", result: await client.listTools(undefined, { timeout }) });
      } else {
        const progress = [];
        const first = messages.length;
        const result = await client.callTool(
          { name: step.name, arguments: step.arguments },
          undefined,
          {
            timeout,
            resetTimeoutOnProgress: true,
            onprogress: (update) => progress.push(update),
          },
        );
        print({
          step: "call",
          name: step.name,
          result,
          progress,
          messages: messages.slice(first),
        });
      }
    } catch (error) {
      print({ ...step, error: errorOf(error) });
    }
  }
  await transport.terminateSession().catch(() => {});
  await client.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
