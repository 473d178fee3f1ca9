-- Argo CD health check for finetune.dev/FineTuneSchedule.
-- Argo CD runs this with the live object in `obj` and reads back { status, message }.
-- Lua 5.1 (gopher-lua): no goto, no integer division, no string.format("%d") on floats.
local hs = { status = "Progressing", message = "" }

local function condition(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function champion_text(status)
  if status.champion == nil or status.champion.job == nil then
    return "no champion yet"
  end
  return "champion " .. status.champion.job
end

local spec = obj.spec or {}
local status = obj.status
local generation = (obj.metadata or {}).generation

if status == nil or status.conditions == nil then
  hs.message = "Waiting for the operator to accept the schedule"
  return hs
end

if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready = condition(status, "Ready")
if ready ~= nil and ready.status == "False" then
  hs.status = "Degraded"
  hs.message = (ready.reason or "") .. ": " .. (ready.message or "")
  return hs
end

if spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "Suspended, " .. champion_text(status)
  return hs
end

-- A failed run is worth a look, but the schedule goes on and its champion still serves.
local failed = condition(status, "LastRunFailed")
if failed ~= nil and failed.status == "True" then
  hs.status = "Degraded"
  hs.message = "Last run failed (" .. (failed.reason or "") .. "): " .. (failed.message or "")
  return hs
end

hs.status = "Healthy"
hs.message = champion_text(status)
if status.active ~= nil and #status.active > 0 then
  hs.message = hs.message .. ", running " .. status.active[1]
end
if ready ~= nil and ready.reason == "MissedSchedule" then
  hs.message = hs.message .. "; " .. (ready.message or "")
end
return hs
