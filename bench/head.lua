-- HEAD requests for wrk.  WRK_RATE > 0 turns each connection into a Poisson source of
-- WRK_RATE / WRK_CONNECTIONS requests a second, so all connections together offer about
-- WRK_RATE requests a second (wrk2 is not in Debian; this is wrk's `delay` hook).  wrk's
-- latency excludes the delay, so the percentiles are those of the requests themselves.
wrk.method = "HEAD"
local rate = tonumber(os.getenv("WRK_RATE") or "0")
local connections = tonumber(os.getenv("WRK_CONNECTIONS") or "1")
local mean_ms = rate > 0 and connections * 1000 / rate or 0

function delay()
   if mean_ms == 0 then
      return 0
   end
   return -math.log(1 - math.random()) * mean_ms
end
