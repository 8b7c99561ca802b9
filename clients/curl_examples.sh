#!/usr/bin/env bash
# curl examples for glm-serve. Each function is one plain request you can copy-paste.
#
#   bash clients/curl_examples.sh                 # run them all
#   bash clients/curl_examples.sh chat stream     # only some: health models chat stream tools embeddings
#   BASE_URL=http://127.0.0.1:6006 API_KEY=sk-... MODEL=chatglm3-6b bash clients/curl_examples.sh
#
# BASE_URL is the server root (no /v1: /health lives outside it). API_KEY is only needed when the
# server runs with API_KEYS. MODEL / EMBEDDING_MODEL default to what /v1/models lists.
set -euo pipefail

BASE_URL="${BASE_URL:-http://127.0.0.1:6006}"
BASE_URL="${BASE_URL%/}"
API_KEY="${API_KEY:-}"

# Only send Authorization when a key is set; the ${AUTH[@]+...} form is safe with set -u on old bash.
AUTH=()
if [[ -n "$API_KEY" ]]; then AUTH=(-H "Authorization: Bearer $API_KEY"); fi

# -sS: no progress bar but still show transport errors; -w: show the status after the body.
req() { curl -sS -w '\n[HTTP %{http_code}]\n' ${AUTH[@]+"${AUTH[@]}"} "$@"; }

# First model of a kind from /v1/models (by "kind" when entries carry it); python3 only parses JSON here.
first_model() {
  local id
  id=$(curl -sS ${AUTH[@]+"${AUTH[@]}"} "$BASE_URL/v1/models" | python3 -c '
import json, sys
try:
    models = json.load(sys.stdin).get("data", [])
except ValueError:
    models = []
want = sys.argv[1]
ids = [m["id"] for m in models]
if any(m.get("kind") for m in models):
    ids = [m["id"] for m in models if (m.get("kind") == "embedding") == (want == "embedding")]
elif want == "embedding":
    ids = ids[-1:] if len(ids) > 1 else []  # untagged: glm-serve lists the embedding model last
print(ids[0] if ids else "")' "$1") || true
  if [[ -z "$id" ]]; then
    echo "error: no $1 model found at $BASE_URL/v1/models (server down, API_KEY missing, or set it yourself:" \
      "$( [[ $1 == chat ]] && echo MODEL || echo EMBEDDING_MODEL )=...)" >&2
    exit 1
  fi
  echo "$id"
}

health() {
  req "$BASE_URL/health"
}

models() {
  req "$BASE_URL/v1/models"
}

chat() {
  req "$BASE_URL/v1/chat/completions" -H "Content-Type: application/json" -d @- <<EOF
{
  "model": "$MODEL",
  "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "你好，请用一句话介绍你自己。"}
  ],
  "temperature": 0.7,
  "max_tokens": 128
}
EOF
}

# -N turns off curl's output buffering so server-sent events appear as they arrive.
stream() {
  req -N "$BASE_URL/v1/chat/completions" -H "Content-Type: application/json" -d @- <<EOF
{
  "model": "$MODEL",
  "messages": [{"role": "user", "content": "Count from 1 to 10."}],
  "max_tokens": 64,
  "stream": true
}
EOF
}

tools() {
  req "$BASE_URL/v1/chat/completions" -H "Content-Type: application/json" -d @- <<EOF
{
  "model": "$MODEL",
  "messages": [{"role": "user", "content": "What's the weather like in Beijing today?"}],
  "tools": [{
    "type": "function",
    "function": {
      "name": "get_current_weather",
      "description": "Get the current weather in a given city",
      "parameters": {
        "type": "object",
        "properties": {
          "location": {"type": "string", "description": "City name, e.g. Beijing"},
          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
        },
        "required": ["location"]
      }
    }
  }],
  "tool_choice": "auto",
  "max_tokens": 128
}
EOF
}

embeddings() {
  req "$BASE_URL/v1/embeddings" -H "Content-Type: application/json" -d @- <<EOF
{
  "model": "$EMBEDDING_MODEL",
  "input": ["The cat sits on the mat.", "今天天气很好。"],
  "encoding_format": "float"
}
EOF
}

steps=("$@")
if [[ ${#steps[@]} -eq 0 ]]; then steps=(health models chat stream tools embeddings); fi

for step in "${steps[@]}"; do
  case "$step" in
    health | models) ;;
    chat | stream | tools) MODEL="${MODEL:-$(first_model chat)}" ;;
    embeddings) EMBEDDING_MODEL="${EMBEDDING_MODEL:-$(first_model embedding)}" ;;
    *) echo "unknown example '$step' (choose: health models chat stream tools embeddings)" >&2; exit 2 ;;
  esac
  echo "=== $step"
  "$step"
  echo
done
