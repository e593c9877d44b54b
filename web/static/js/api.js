// The server's JSON API, as the pages use it. Every call sends the session cookie
// (same-origin) and turns a non-2xx answer into an ApiError carrying the server's message.

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.body = body;
  }
}

/** One JSON call: the parsed answer, or an ApiError (status 0: the server was not reached). */
export async function request(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "Cannot reach the server. Check your connection.", null);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = (data && typeof data.error === "string" && data.error) ||
      `The server answered ${response.status} ${response.statusText}`.trim();
    throw new ApiError(response.status, message, data);
  }
  return data;
}

export const api = {
  /** Live channels, most watched first. */
  live: () => request("GET", "/api/live"),
  /** One live channel; rejects with status 404 while it is offline. */
  channel: (channel) => request("GET", `/api/live/${encodeURIComponent(channel)}`),
  me: () => request("GET", "/api/me"),
  updateMe: (fields) => request("PATCH", "/api/me", fields),
  rotateStreamKey: () => request("POST", "/api/me/stream-key"),
  login: (username, password) => request("POST", "/api/auth/login", { username, password }),
  register: (username, password) => request("POST", "/api/auth/register", { username, password }),
  logout: () => request("POST", "/api/auth/logout"),
};

/** The channel if it is live now, or null while it is offline (other errors propagate). */
export async function liveChannel(channel) {
  try {
    return await api.channel(channel);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) return null;
    throw err;
  }
}
