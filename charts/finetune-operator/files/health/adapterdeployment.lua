-- Argo CD health check for finetune.dev/AdapterDeployment.
-- Argo CD runs this with the live object in `obj` and reads back { status, message }.
-- Lua 5.1 (gopher-lua): no goto, no integer division.
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

local function revision_text(status)
  local cur = status.current
  if cur == nil or cur.revision == nil then
    return ""
  end
  return " revision " .. tostring(cur.revision)
end

local spec = obj.spec or {}
local status = obj.status
local generation = (obj.metadata or {}).generation

if status == nil or status.phase == nil then
  hs.message = "Waiting for the operator to accept the deployment"
  return hs
end

if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
if spec.suspend == true or phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended"
  return hs
end

if phase == "Available" then
  hs.status = "Healthy"
  hs.message = "Serving" .. revision_text(status)
  if status.readyReplicas ~= nil then
    hs.message = hs.message .. " on " .. tostring(status.readyReplicas) .. " ready replica(s)"
  end
  return hs
end

if phase == "RolledBack" or phase == "Degraded" or phase == "Failed" then
  hs.status = "Degraded"
  local detail = latest_message(status)
  if detail == "" then
    hs.message = phase
  else
    hs.message = phase .. " - " .. detail
  end
  return hs
end

if phase == "Pending" or phase == "Progressing" or phase == "Analyzing" then
  hs.status = "Progressing"
  hs.message = phase .. revision_text(status)
  if phase == "Analyzing" and status.canary ~= nil and status.canary.checksPassed ~= nil then
    hs.message = hs.message .. ", canary checks passed: " .. tostring(status.canary.checksPassed)
  end
  return hs
end

hs.status = "Unknown"
hs.message = "Unrecognised phase " .. tostring(phase)
return hs
