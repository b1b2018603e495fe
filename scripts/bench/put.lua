-- wrk script: PUTs to the shared bucket of one of N registered devices, round robin per
-- thread, with a stale base version (so every write is a field merge, never refused).
-- TETHER_BENCH_AUTH names a file of `<serial> <base64(a.<serial>:<assigned secret>)>`
-- lines written by scripts/bench/put-throughput.
local serials, headers = {}, {}
local f = assert(io.open(os.getenv("TETHER_BENCH_AUTH"), "r"))
for line in f:lines() do
  local serial, b64 = line:match("^(%S+) (%S+)$")
  if serial then
    serials[#serials + 1] = serial
    headers[#headers + 1] = "Basic " .. b64
  end
end
f:close()
local counter = 0

request = function()
  local i = counter % #serials + 1
  counter = counter + 1
  local body = string.format('{"value":{"target_temperature":%d},"base_version":0}', counter % 30)
  return wrk.format("PUT", "/v1/buckets/shared." .. serials[i],
    { ["Content-Type"] = "application/json", ["Authorization"] = headers[i] }, body)
end
