-- wrk script: PUTs to the shared bucket of one of N registered devices, round robin per
-- thread, with a stale base version (so every write is a field merge, never refused).
local devices = tonumber(os.getenv("TETHER_BENCH_DEVICES") or "100")
local counter = 0
local auth = {}
for i = 0, devices - 1 do
  local serial = string.format("BENCH%04d", i)
  -- Basic base64("a.<serial>:x") computed by the caller into env is awkward; build it here.
  auth[i] = serial
end

local b64chars = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
local function b64(data)
  return ((data:gsub('.', function(x)
    local r, b = '', x:byte()
    for i = 8, 1, -1 do r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and '1' or '0') end
    return r
  end) .. '0000'):gsub('%d%d?%d?%d?%d?%d?', function(x)
    if #x < 6 then return '' end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == '1' and 2 ^ (6 - i) or 0) end
    return b64chars:sub(c + 1, c + 1)
  end) .. ({ '', '==', '=' })[#data % 3 + 1])
end

local headers = {}
for i = 0, devices - 1 do
  headers[i] = "Basic " .. b64("a." .. auth[i] .. ":x")
end

request = function()
  local i = counter % devices
  counter = counter + 1
  local body = string.format('{"value":{"target_temperature":%d},"base_version":0}', counter % 30)
  return wrk.format("PUT", "/v1/buckets/shared." .. auth[i],
    { ["Content-Type"] = "application/json", ["Authorization"] = headers[i] }, body)
end
