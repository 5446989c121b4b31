-- wrk script: POST a JSON-RPC tools/call (the bench echo tool) within one MCP session.
--
-- Environment: MCP_SESSION_ID (required), BEARER_TOKEN (optional: adds Authorization),
-- MCP_PROTOCOL_VERSION (default 2025-06-18), ID_BASE (a number: ids are ID_BASE + n, so no two
-- runs against one session reuse a request id while an earlier run's last requests may still be
-- in flight); MCP_MODERN=1: MCP 2026-07-28 instead (no session: each call carries its envelope
-- in params._meta and the Mcp-Method/Mcp-Name headers).  Run with one thread (-t1): ids come from a per-thread counter.
-- done() prints one line "WRKJSON {...}" with the summary and latency percentiles (µs).

local sid = os.getenv("MCP_SESSION_ID")
local token = os.getenv("BEARER_TOKEN")
local id_base = tonumber(os.getenv("ID_BASE") or "0")
local n = 0

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
local modern = os.getenv("MCP_MODERN") == "1"
wrk.headers["MCP-Protocol-Version"] = os.getenv("MCP_PROTOCOL_VERSION") or "2025-06-18"
if modern then
  wrk.headers["MCP-Protocol-Version"] = "2026-07-28"
  wrk.headers["Mcp-Method"] = "tools/call"
  wrk.headers["Mcp-Name"] = "echo"
elseif sid and sid ~= "" then
  wrk.headers["Mcp-Session-Id"] = sid
end
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end

local head = '{"jsonrpc":"2.0","id":'
local tail = ',"method":"tools/call","params":{"name":"echo","arguments":{"message":"hello from wrk"}}}'
if modern then
  tail = ',"method":"tools/call","params":{"name":"echo","arguments":{"message":"hello from wrk"},' ..
    '"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",' ..
    '"io.modelcontextprotocol/clientCapabilities":{},' ..
    '"io.modelcontextprotocol/clientInfo":{"name":"bastion-bench","version":"1"}}}}'
end

request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, head .. string.format("%d", id_base + n) .. tail)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
