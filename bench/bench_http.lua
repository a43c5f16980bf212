-- wrk script of bench_http.py: POST /counter/o<i>/increment, i round-robin over N objects
-- (`wrk ... -s bench_http.lua <url> -- N`; N = 1: every request to the same object). Each wrk
-- thread starts at its own offset, so the threads do not walk the objects in step.

local objects = 1
local next_index = 0
local counter = 0

function setup(thread)
   thread:set("thread_offset", counter)
   counter = counter + 1
end

function init(args)
   -- thread_offset: a global, set by setup() in this thread's own Lua state
   objects = tonumber(args[1]) or 1
   next_index = ((thread_offset or 0) * 37) % objects
end

function request()
   local path = "/counter/o" .. next_index .. "/increment"
   next_index = (next_index + 1) % objects
   return wrk.format("POST", path, nil, "")
end
