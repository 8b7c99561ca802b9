// The Vercel AI SDK's Responses provider against glm-serve, called as a chat web app calls it:
// generateText, a second turn that sends the first answer back (as an item_reference), and streamText.
// Usage: node responses_ai_sdk.mjs BASE_URL MODEL PROMPT MAX_OUTPUT_TOKENS  -> one JSON line on stdout.
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, streamText } from "ai";

const [baseURL, modelId, prompt, maxOutputTokens] = process.argv.slice(2);
const sent = []; // the request bodies, as the SDK wrote them
const recording = (url, init) => (sent.push(JSON.parse(init.body)), fetch(url, init));
const model = createOpenAI({ baseURL, apiKey: "sk-test", fetch: recording }).responses(modelId);
const settings = { model, temperature: 0, maxOutputTokens: Number(maxOutputTokens), maxRetries: 0 };

const first = await generateText({ ...settings, prompt });
const followUp = [{ role: "user", content: prompt }, ...first.response.messages, { role: "user", content: "Why?" }];
const second = await generateText({ ...settings, messages: followUp });

const errors = [];
const streamed = streamText({ ...settings, prompt, onError: ({ error }) => errors.push(String(error)) });
let text = "";
for await (const piece of streamed.textStream) text += piece;
if (errors.length) throw new Error(`streamText failed: ${errors.join("; ")}`);

const summary = async (r, text) => ({
  text, finishReason: await r.finishReason, usage: await r.usage, id: (await r.response).id,
  warnings: await r.warnings,
});
console.log(JSON.stringify({
  generated: await summary(first, first.text),
  followUp: await summary(second, second.text),
  streamed: await summary(streamed, text),
  sent,
}));
