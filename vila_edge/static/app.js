// vila-edge live page: newest frame as MJPEG, captions over server-sent events, and with a watch
// (serve --watch-ask) its current answer and change events (/watch/events). No dependencies.
(function () {
  "use strict";
  var key = new URLSearchParams(location.search).get("key");
  var q = key ? "?key=" + encodeURIComponent(key) : "";
  var $ = function (id) { return document.getElementById(id); };
  var frame = $("frame"), caption = $("caption"), meta = $("meta"), status = $("status");
  var history = $("history"), lastDone = 0, lastText = "";

  function setStatus(text, cls) { status.textContent = text; status.className = "status " + (cls || ""); }

  frame.addEventListener("load", function () { $("noframe").style.display = "none"; });
  frame.addEventListener("error", function () {
    $("noframe").style.display = "";
    setTimeout(function () { frame.src = "stream.mjpg" + q + (q ? "&" : "?") + "t=" + Date.now(); }, 2000);
  });

  fetch("camera/state" + q).then(function (r) { return r.json(); }).then(function (s) {
    $("prompt").textContent = s.prompt || "";
    $("model").textContent = "model: " + s.model + " · a new caption every " + s.interval + " s after the last";
    if (s.watch) startWatch(s.watch);
  }).catch(function () {});

  // ---- the watch: question, current answer, log of change events --------------------------------------
  var watchLog = $("watch-log"), lastWatch = "", WATCH_LOG_MAX = 100;

  function frameTime(ev) {
    var d = ev.time ? new Date(ev.time) : null;
    return d && !isNaN(d) ? d.toLocaleTimeString() : "";
  }

  function showWatchEvent(id, data) {
    if (id + " " + data === lastWatch) return;  // the current answer again (sent first on every reconnect)
    lastWatch = id + " " + data;
    var ev = JSON.parse(data), text = JSON.stringify(ev.answer);
    $("watch-answer").textContent = text.length > 48 ? JSON.stringify(ev.answer, null, 2) : text;
    $("watch-meta").textContent = "since frame " + ev.frame + (ev.time ? " · " + frameTime(ev) : "");
    var li = document.createElement("li"), t = document.createElement("time"), c = document.createElement("code");
    t.textContent = frameTime(ev) + " · frame " + ev.frame;
    if (ev.time) t.setAttribute("datetime", ev.time);
    c.textContent = text;
    li.appendChild(t); li.appendChild(c);
    watchLog.insertBefore(li, watchLog.firstChild);  // newest first
    while (watchLog.children.length > WATCH_LOG_MAX) watchLog.removeChild(watchLog.lastChild);
  }

  function startWatch(w) {
    $("watch").hidden = false;
    $("watch-question").textContent = w.question;
    var es = new EventSource("watch/events" + q);
    es.onmessage = function (m) {
      try { showWatchEvent(m.lastEventId, m.data); } catch (err) { /* ignore a bad event */ }
    };
  }

  function show(ev) {
    if (ev.waiting) { caption.textContent = "waiting for the first caption…"; caption.className = "caption pending"; return; }
    if (ev.error) {
      meta.innerHTML = ""; var e = document.createElement("span"); e.className = "error";
      e.textContent = "error: " + ev.error; meta.appendChild(e);
    }
    caption.textContent = ev.text || (ev.done ? "(empty answer)" : "");
    caption.className = ev.done ? "caption" : "caption pending";
    if (ev.done && !ev.error) {
      meta.textContent = "caption #" + ev.id + " of frame " + ev.frame + " · " + ev.seconds + " s · " + ev.finish_reason;
      if (ev.id !== lastDone) {
        if (lastText) {  // the caption this one replaces moves to the list of earlier ones
          var li = document.createElement("li"); li.textContent = lastText; history.insertBefore(li, history.firstChild);
          while (history.children.length > 5) history.removeChild(history.lastChild);
        }
        lastDone = ev.id; lastText = ev.text;
      }
    }
  }

  function connect() {
    var es = new EventSource("captions" + q);
    es.onopen = function () { setStatus("live", "live"); };
    es.onmessage = function (m) { try { show(JSON.parse(m.data)); } catch (err) { /* ignore a bad event */ } };
    es.onerror = function () { setStatus("reconnecting…", "down"); };
  }

  // The MJPEG stream never ends, so the page's load event never fires (as with any MJPEG camera page).
  frame.src = "stream.mjpg" + q;
  connect();
})();
