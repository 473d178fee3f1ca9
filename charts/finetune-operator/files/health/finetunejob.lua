-- Argo CD health check for finetune.dev/FineTuneJob.
-- Argo CD runs this with the live object in `obj` and reads back { status, message }.
-- Lua 5.1 (gopher-lua): no goto, no integer division, no string.format("%d") on floats.
local hs = { status = "Progressing", message = "" }

-- The condition with a message that changed last: the freshest explanation of the phase.
local function latest_message(status)
  local best_time, best_message = "", ""
  if status.conditions == nil then
    return best_message
  end
  for _, c in ipairs(status.conditions) do
    local t = c.lastTransitionTime or ""
    if c.message ~= nil and c.message ~= "" and t >= best_time then
      best_time = t
      best_message = (c.reason or "") .. ": " .. c.message
    end
  end
  return best_message
end

local function progress_text(status)
  local p = status.progress
  if p == nil or p.step == nil or p.totalSteps == nil then
    return ""
  end
  return " (step " .. tostring(p.step) .. "/" .. tostring(p.totalSteps) .. ")"
end

local spec = obj.spec or {}
local status = obj.status
local generation = (obj.metadata or {}).generation

if status == nil or status.phase == nil then
  hs.message = "Waiting for the operator to accept the job"
  return hs
end

if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Adapter ready"
  if status.gatesSummary ~= nil then
    hs.message = hs.message .. ", gates " .. status.gatesSummary
  end
  if status.adapter ~= nil and status.adapter.digest ~= nil then
    hs.message = hs.message .. " (" .. status.adapter.digest .. ")"
  end
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = latest_message(status)
  if hs.message == "" then
    hs.message = "Job failed"
  end
  return hs
end

if spec.suspend == true or phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended" .. progress_text(status)
  return hs
end

if phase == "Pending" or phase == "Queued" or phase == "Training" or phase == "Evaluating" then
  hs.status = "Progressing"
  hs.message = phase .. progress_text(status)
  return hs
end

hs.status = "Unknown"
hs.message = "Unrecognised phase " .. tostring(phase)
return hs
