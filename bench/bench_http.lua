-- wrk script of bench_http.py: POST an increment to object o<i>, i round-robin over N objects.
--   wrk ... -s bench_http.lua <url> -- N [path template]
-- N = 1: every request goes to the same object. The path template is a printf format with %d
-- for i (default /counter/o%d/increment; Restate's ingress: /Counter/o%d/increment). Each wrk
-- thread starts at its own offset, so the threads do not walk the objects in step.

local objects = 1
local template = "/counter/o%d/increment"
local next_index = 0
local counter = 0

function setup(thread)
   thread:set("thread_offset", counter)
   counter = counter + 1
end

function init(args)
   -- thread_offset: a global, set by setup() in this thread's own Lua state
   objects = tonumber(args[1]) or 1
   template = args[2] or template
   next_index = ((thread_offset or 0) * 37) % objects
end

function request()
   local path = string.format(template, next_index)
   next_index = (next_index + 1) % objects
   return wrk.format("POST", path, nil, "")
end
